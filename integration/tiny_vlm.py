"""Build a tiny LLaVA model directory from scratch: no hub, deterministic weights.

vLLM serves it on the CPU like a real llava-hf checkpoint:
- vision: CLIP ViT, 336 px images in 14 px patches -> 576 image tokens;
- projector: MLP 64 -> TEXT_HIDDEN -> TEXT_HIDDEN, so one image's embedding (what
  vLLM's encoder cache holds) is 576 x TEXT_HIDDEN x 2 bytes = 1.125 MiB in bf16;
- text: one Llama layer, head size 64 (vLLM's CPU attention needs >= 32);
- tokenizer: character-level over printable ASCII, written here, so every
  generated token decodes to a visible character.
LLaVA's processing is a plain CLIP image processor (PIL backend): it needs
none of torchvision's compiled operators.

`vision_seed` gives the vision tower different weights while everything else
stays the same: an instance built so encodes images differently, which is how
the tests prove that PD used the encoder's output and not its own.

    python -m integration.tiny_vlm OUT_DIR [--vision-seed N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

SEED = 1234
IMAGE_SIZE = 336
PATCH = 14
TEXT_HIDDEN = 1024
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
# Larger than the usual 0.02 so that different images give different greedy outputs.
INIT_STD = 0.2
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


LLAVA_7B_HIDDEN = 4096  # what the benchmarks use: LLaVA-1.5-7B's 576 x 4096 bf16, 4.5 MiB


def add_text_hidden_argument(parser) -> None:
    """`--text-hidden`, for the benchmarks that build the model."""
    parser.add_argument(
        "--text-hidden",
        type=int,
        default=LLAVA_7B_HIDDEN,
        help="embedding width; 4096 = LLaVA-1.5-7B, 4.5 MiB per image",
    )


def embedding_bytes(text_hidden: int = TEXT_HIDDEN) -> int:
    """Bytes of one image's embedding in vLLM's encoder cache (bf16)."""
    return IMAGE_TOKENS * text_hidden * 2


def _tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for ch in ["\n"] + [chr(c) for c in range(0x20, 0x7F)]:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _llava_hf_key(key: str) -> str | None:
    """transformers 5 names -> the llava-hf checkpoint layout vLLM's loader expects."""
    if key.startswith("lm_head."):
        return None  # tied to the input embeddings
    if key.startswith("model.language_model."):
        return "language_model.model." + key.removeprefix("model.language_model.")
    if key.startswith("model.vision_tower."):
        rest = key.removeprefix("model.vision_tower.")
        return "vision_tower." + (
            rest if rest.startswith("vision_model.") else "vision_model." + rest
        )
    return key.removeprefix("model.")


def build(out: Path, vision_seed: int | None = None, text_hidden: int = TEXT_HIDDEN) -> Path:
    """Write the model directory `out` (config, tokenizer, processor, weights).

    `text_hidden` sets the embedding size: 4096 gives LLaVA-1.5-7B's 576 x 4096
    (4.5 MiB per image in bf16)."""
    from safetensors.torch import save_file
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=64,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=IMAGE_TOKENS,
        tie_word_embeddings=True,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration(config)
    # Our own initialisation, independent of transformers' internals: one
    # generator for the vision tower, one for everything else.
    generators = {
        "vision": torch.Generator().manual_seed(SEED if vision_seed is None else vision_seed),
        "rest": torch.Generator().manual_seed(SEED),
    }
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            generator = generators["vision" if ".vision_tower." in name else "rest"]
            if "norm" in name:
                param.fill_(1.0) if name.endswith("weight") else param.zero_()
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    weights = {}
    for key, value in model.state_dict().items():
        if (name := _llava_hf_key(key)) is not None:
            weights[name] = value.contiguous().clone()
    save_file(dict(sorted(weights.items())), out / "model.safetensors", metadata={"format": "pt"})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            do_center_crop=True,
        ),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="model directory to write")
    parser.add_argument("--vision-seed", type=int, help="different vision-tower weights")
    parser.add_argument("--text-hidden", type=int, default=TEXT_HIDDEN, help="embedding width")
    args = parser.parse_args()
    build(args.out, args.vision_seed, args.text_hidden)
    size = f"{IMAGE_TOKENS}x{args.text_hidden} bf16 = {embedding_bytes(args.text_hidden)} bytes"
    print(f"wrote {args.out}: one image embeds to {size}")


if __name__ == "__main__":
    main()
