"""Text-to-image PixelFlow: sampling a converted text-conditional checkpoint from prompts.

    --config=configs/t2i.py          the release's text-to-image setting: T5 (flan-t5-xl) prompts
                                     padded to 512 tokens, negative prompt "", constant CFG 4,
                                     10 Euler steps per stage (the release's demo defaults)
    --config=configs/t2i.py:tiny     a 2-head, depth-2 model with 20-wide text embeddings: tests

    python main.py --config=configs/t2i.py --workdir=runs/t2i --mode=sample \\
        --config.sample.checkpoint=checkpoints/pixelflow_t2i \\
        --config.sample.text_encoder=/path/to/flan-t5-xl \\
        --config.sample.prompts='("a red fox in the snow", "a lighthouse at dusk")'

The architecture, number of stages and resolution come from the checkpoint. Everything in
configs/c2i.py applies; the text-specific values are under `sample` below.
"""

import ml_collections

from configs import c2i


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = c2i.get_config("tiny" if arg == "tiny" else "")
    config.model.update(num_classes=0, cross_attention_dim=2048)  # flan-t5-xl's d_model
    config.sample.update(dict(
        num_images=0,  # unused: a text run makes len(prompts) * images_per_prompt images
        cfg_scale=4.0,  # constant over stages for text (PARITY.md)
        steps_per_stage=10,
    ))
    config.sample.prompts = ml_collections.FieldReference((), field_type=object)  # a list of prompts
    config.sample.prompts_file = ""  # or a text file, one prompt per line
    config.sample.images_per_prompt = 1  # image i shows prompt i // images_per_prompt
    config.sample.negative_prompt = ""
    # A Hugging Face T5 folder (config.json, weights, spiece.model) or hf://google/flan-t5-xl.
    config.sample.text_encoder = ""
    config.sample.text_encoder_param_dtype = "float32"  # 'bfloat16' halves the encoder's memory
    config.sample.max_text_tokens = 512  # the release pads and truncates prompts to 512 tokens
    if arg == "tiny":
        config.model.update(num_classes=0, cross_attention_dim=20)
        config.sample.update(batch_size=8, steps_per_stage=3)
    elif arg:
        raise ValueError(f"unknown t2i config variant {arg!r}; choose '' or 'tiny'")
    return config
