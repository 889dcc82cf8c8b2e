"""DICOM decoding against pydicom's reference pixels (pydicom.examples) and hand-computed files: modality LUT,
VOI LUT sequence, LINEAR / LINEAR_EXACT / SIGMOID windows, MONOCHROME1, signed pixels, frames and per-frame
functional groups, colour, compressed data without a decoder, MedGemma's CT windows, and no tag values in
messages."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgemed.data import load_image, load_image_bytes
from edgemed.dicom import CT_WINDOWS
from edgemed.errors import DataError

examples = pytest.importorskip("pydicom.examples")


def arr(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


def grey(im: Image.Image) -> np.ndarray:
    a = arr(im)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0]


def u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(int)


def save(ds, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def make(stored: np.ndarray, *, signed: bool = False, frames: int = 1, **elements) -> object:
    """A 16-bit MONOCHROME2 dataset holding ``stored`` (rows x cols, or frames x rows x cols)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(signed)
    if frames > 1:
        ds.NumberOfFrames = frames
    for k, v in elements.items():
        setattr(ds, k, v)
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    return ds


# ---------------------------------------------------------------- pydicom.examples: reference pixels
def test_ct_example_matches_pydicom_modality_lut(tmp_path):
    from pydicom.pixels import apply_modality_lut

    ds = examples.ct  # signed 16-bit CT, rescale to HU, no window: the frame's min..max
    hu = apply_modality_lut(ds.pixel_array, ds).astype(float)
    want = u8((hu - hu.min()) / (hu.max() - hu.min()))
    got = grey(load_image(save(examples.ct, tmp_path / "ct.dcm")))
    assert (got == want).all()


def test_mr_example_window_matches_pydicom_and_the_standard(tmp_path):
    from pydicom.pixels import apply_voi_lut

    ds = examples.mr
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    x = ds.pixel_array.astype(float)
    # PS3.3 C.11.2.1.2.1, LINEAR, to 0..1 by hand
    want = u8(np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1))
    got = grey(load_image(save(examples.mr, tmp_path / "mr.dcm")))
    assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.99
    # and pydicom's own windowing over its output range (signed 16 bit) agrees
    ref = apply_voi_lut(x, ds)
    lo, hi = -(2 ** 15), 2 ** 15 - 1
    assert np.abs(got - u8((ref - lo) / (hi - lo))).max() <= 1


def test_rgb_and_ybr_examples_match_pydicom(tmp_path):
    got = arr(load_image(save(examples.rgb_color, tmp_path / "rgb.dcm")))
    assert (got == examples.rgb_color.pixel_array.astype(int)).all()
    if importlib.util.find_spec("libjpeg") is None:
        pytest.skip("pylibjpeg-libjpeg not installed (edgemed[dicom])")
    from pydicom.pixels import pixel_array

    f = save(examples.ybr_color, tmp_path / "ybr.dcm")  # JPEG baseline, YBR_FULL_422, 30 frames
    got = arr(load_image(f, frame=4))
    assert (got == pixel_array(examples.ybr_color, index=4).astype(int)).all()  # pydicom converts YBR to RGB


def test_palette_colour_example(tmp_path):
    from pydicom.pixels import apply_color_lut

    ds = examples.palette_color
    want = u8(apply_color_lut(ds.pixel_array, ds) / 65535.0)  # 16-bit palette entries
    assert (arr(load_image(save(examples.palette_color, tmp_path / "pal.dcm"))) == want).all()


def test_ct_windows_rendering(tmp_path):
    from pydicom.pixels import apply_modality_lut

    ds = examples.ct
    hu = apply_modality_lut(ds.pixel_array, ds).astype(float)
    got = arr(load_image(save(examples.ct, tmp_path / "ct.dcm"), render="ct-windows"))
    for ch, (lo, hi) in enumerate(CT_WINDOWS):
        assert (got[..., ch] == u8((np.clip(hu, lo, hi) - lo) / (hi - lo))).all()
    assert CT_WINDOWS == ((-1024, 1024), (-135, 215), (0, 80))
    # not CT: the file's own rendering
    mr = save(examples.mr, tmp_path / "mr.dcm")
    assert (arr(load_image(mr, render="ct-windows")) == arr(load_image(mr))).all()
    with pytest.raises(DataError, match="unknown DICOM rendering 'hot'"):
        load_image(mr, render="hot")


def test_every_window_goes_through_pydicoms_voi_lut(tmp_path, monkeypatch):
    """No hand-written windowing: the file's window and each of the three CT windows are pydicom's apply_voi_lut."""
    import pydicom.pixels

    real, calls = pydicom.pixels.apply_voi_lut, []

    def counted(arr, ds, *a, **kw):
        calls.append((float(ds.WindowCenter), float(ds.WindowWidth), str(ds.get("VOILUTFunction", "LINEAR"))))
        return real(arr, ds, *a, **kw)

    monkeypatch.setattr(pydicom.pixels, "apply_voi_lut", counted)
    ct = save(examples.ct, tmp_path / "ct.dcm")
    load_image(ct, render="ct-windows")
    assert calls == [((lo + hi) / 2, hi - lo, "LINEAR_EXACT") for lo, hi in CT_WINDOWS]
    calls.clear()
    load_image(save(examples.mr, tmp_path / "mr.dcm"))
    assert calls == [(float(examples.mr.WindowCenter), float(examples.mr.WindowWidth), "LINEAR")]


def test_compressed_without_decoder_names_the_extra(tmp_path, monkeypatch):
    import pydicom.pixels

    f = save(examples.jpeg2k, tmp_path / "j2k.dcm")
    try:
        pydicom.pixels.pixel_array(examples.jpeg2k)
    except Exception:  # noqa: BLE001 - no JPEG 2000 decoder here: the real error path
        pass
    else:  # a decoder is installed (Pillow's or openjpeg): pydicom's own no-plugin error, raised on purpose
        def no_plugin(*a, **k):
            raise RuntimeError("Unable to decompress 'JPEG 2000 Image Compression (Lossless Only)' pixel data "
                               "because all plugins are missing dependencies")

        monkeypatch.setattr(pydicom.pixels, "pixel_array", no_plugin)
    with pytest.raises(DataError, match=r"j2k\.dcm: the pixel data is compressed \(JPEG 2000.*edgemed\[dicom\]"):
        load_image(f)


# ---------------------------------------------------------------- VOI functions on generated files
X = np.array([[0, 10, 20, 30], [40, 50, 60, 100]])


@pytest.mark.parametrize("func, ref", [
    ("LINEAR", lambda x, c, w: np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)),
    ("LINEAR_EXACT", lambda x, c, w: np.clip((x - c) / w + 0.5, 0, 1)),
    ("SIGMOID", lambda x, c, w: 1 / (1 + np.exp(-4 * (x - c) / w))),
])
def test_voi_lut_functions(tmp_path, func, ref):
    c, w = 40.0, 50.0
    f = save(make(X, WindowCenter=c, WindowWidth=w, VOILUTFunction=func), tmp_path / "w.dcm")
    got = grey(load_image(f))
    assert np.abs(got - u8(ref(X.astype(float), c, w))).max() <= 1, (func, got)


def test_voi_lut_sequence_wins_over_window(tmp_path):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [4, 10, 8]  # 4 entries, first maps value 10, 8-bit output
    item.add_new(0x00283006, "US", [0, 100, 200, 255])  # LUT Data, US (its OW form needs bytes)
    ds = make(np.array([[0, 10, 11, 12], [13, 14, 50, 9]]), WindowCenter=100, WindowWidth=10, VOILUTSequence=[item])
    # below the first mapped value -> first entry; above the last -> last entry
    assert grey(load_image(save(ds, tmp_path / "lut.dcm"))).tolist() == [[0, 0, 100, 200], [255, 255, 255, 0]]
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert grey(load_image(save(ds, tmp_path / "lut1.dcm"))).tolist() == [[255, 255, 155, 55], [0, 0, 0, 255]]


def test_signed_pixels_with_rescale_and_window(tmp_path):
    stored = np.array([[-1000, -500], [0, 1000]])
    ds = make(stored, signed=True, RescaleSlope=1, RescaleIntercept=-24, WindowCenter=-24, WindowWidth=2001)
    hu = stored - 24.0
    want = u8(np.clip((hu - (-24 - 0.5)) / 2000 + 0.5, 0, 1))
    assert np.abs(grey(load_image(save(ds, tmp_path / "s.dcm"))) - want).max() <= 1


def test_frames_and_per_frame_functional_groups(tmp_path):
    from pydicom.dataset import Dataset

    stored = np.stack([np.full((2, 2), v) for v in (10, 20, 30)])
    stored[:, 0, 0] = 0
    groups = []
    for slope, center in ((1, 5), (2, 40), (1, 100)):
        g, pvt, voi = Dataset(), Dataset(), Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = slope, 0, "US"
        voi.WindowCenter, voi.WindowWidth = center, 11
        g.PixelValueTransformationSequence, g.FrameVOILUTSequence = [pvt], [voi]
        groups.append(g)
    ds = make(stored, frames=3, PerFrameFunctionalGroupsSequence=groups)
    f = save(ds, tmp_path / "mf.dcm")
    lin = lambda x, c, w=11: u8(np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1))  # noqa: E731
    assert grey(load_image(f)).tolist() == lin(np.array([[0, 10], [10, 10]]), 5).tolist()  # first frame
    # frame 1: value 20, slope 2 -> 40 at its own centre 40 -> mid grey; 0 stays black
    assert grey(load_image(f, frame=1)).tolist() == lin(np.array([[0, 40], [40, 40]]), 40).tolist()
    assert grey(load_image_bytes(f.read_bytes(), "application/dicom", frame=2)).tolist() == \
        lin(np.array([[0, 30], [30, 30]]), 100).tolist()
    with pytest.raises(DataError, match=r"mf\.dcm: frame 3 does not exist; the file has 3 frame\(s\), 0\.\.2"):
        load_image(f, frame=3)


def test_no_tag_value_in_messages_or_logs(tmp_path, caplog):
    secret = "Doe^Verysecret"
    ds = make(X, PatientName=secret, PatientID="ID-7734", WindowCenter="40", WindowWidth="0.2")
    f = save(ds, tmp_path / "p.dcm")
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_image(f)  # a window width below 1 is invalid: the frame's range is used instead
        del ds.PixelData
        g = save(ds, tmp_path / "nopix.dcm")
        with pytest.raises(DataError) as e:
            load_image(g)
    text = caplog.text + str(e.value) + " ".join(str(w.message) for w in seen)
    assert "Verysecret" not in text and "7734" not in text
    assert "no pixel data" in str(e.value)


def test_ct_rendering_is_chosen_by_the_arch():
    from edgemed.archs import REGISTRY
    from edgemed.dicom import RENDERS

    assert REGISTRY["gemma3"].dicom_render == "ct-windows"  # MedGemma's family
    assert all(a.dicom_render in RENDERS for a in REGISTRY.values())
    assert {a.dicom_render for n, a in REGISTRY.items() if n != "gemma3"} == {"voi"}
