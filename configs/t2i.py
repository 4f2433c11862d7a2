"""Text-to-image PixelFlow: training on captioned images, and sampling from prompts.

    --config=configs/t2i.py          the release's text-to-image setting: T5 (flan-t5-xl) prompts
                                     padded to 512 tokens, negative prompt "", constant CFG 4,
                                     10 Euler steps per stage (the release's demo defaults)
    --config=configs/t2i.py:tiny     a 2-head, depth-2 model with 20-wide text embeddings: tests
    --config=configs/t2i.py:demo     a small model trained on the captioned demo set on a CPU, with
                                     a small T5 encoder the run builds itself (nothing downloaded)

    python main.py --config=configs/t2i.py:demo --workdir=runs/t2i_demo                 # train
    python main.py --config=configs/t2i.py:demo --workdir=runs/t2i_demo --mode=sample \\
        --config.sample.prompts='("a red disk", "a blue triangle")'                     # sample it

    python main.py --config=configs/t2i.py --workdir=runs/t2i --mode=sample \\
        --config.sample.checkpoint=checkpoints/pixelflow_t2i \\
        --config.sample.text_encoder=/path/to/flan-t5-xl \\
        --config.sample.prompts='("a red fox in the snow", "a lighthouse at dusk")'

The architecture, number of stages and resolution come from the checkpoint. Everything in
configs/c2i.py applies except the class-only `train.label_dropout` and the TFDS fields
(`data.tfds_name`, `tfds_data_dir`, `split`), which are removed here; the text-specific values are
under `sample`, `train` and `data` below.
"""

import ml_collections

from configs import c2i


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = c2i.get_config("tiny" if arg == "tiny" else "")
    config.model.update(num_classes=0, cross_attention_dim=2048)  # flan-t5-xl's d_model
    config.sample.update(dict(
        num_images=0,  # unused: a text run makes len(prompts) * images_per_prompt images
        cfg_scale=4.0,  # constant over stages for text, as the release's text-to-image sampler
        steps_per_stage=10,
    ))
    config.sample.prompts = ml_collections.FieldReference((), field_type=object)  # a list of prompts
    config.sample.prompts_file = ""  # or a text file, one prompt per line
    config.sample.images_per_prompt = 1  # image i shows prompt i // images_per_prompt
    config.sample.negative_prompt = ""
    # A Hugging Face T5 folder (config.json, weights, spiece.model) or hf://google/flan-t5-xl.
    config.sample.text_encoder = ""
    # The encoder's weights: '' = those of the training run (its train.text_encoder_dtype), else
    # float32; 'bfloat16' halves the encoder's memory.
    config.sample.text_encoder_param_dtype = ""
    # 0: the run's own setting when sampling a training run, else 512 (the release pads and
    # truncates prompts to 512 tokens).
    config.sample.max_text_tokens = 0

    # Training (pixelflow_jax/text/train_text.py): captioned data and a frozen T5 encoder in the step.
    config.data.source = "folder"  # 'folder' (NAME.jpg + NAME.txt) | 'array_record' | 'demo' (captioned)
    config.data.missing_captions = "error"  # or 'skip': images without NAME.txt are left out and counted
    config.train.text_encoder = ""  # T5 folder or hf://google/flan-t5-xl; '' on the demo set: built by the run
    config.train.max_text_tokens = 512  # the release's; 77-128 cover most captions at a fraction of the cost
    config.train.text_encoder_dtype = "float32"  # the frozen encoder's parameters; 'bfloat16' halves them
    config.train.caption_dropout = 0.1  # captions replaced by "" (the release's negative prompt)
    if arg == "tiny":
        config.model.update(num_classes=0, cross_attention_dim=20)
        config.data.update(source="demo", demo_num_classes=10)
        config.train.update(max_text_tokens=16)
        config.sample.update(batch_size=8, steps_per_stage=3)
    elif arg == "demo":
        demo = c2i.get_config("demo")
        config.model.update(demo.model.to_dict())
        # pooled_text: with cross-attention alone (the release's architecture) samples took the asked
        # shape 36% of the time after 7,500 steps; with the pooled caption also in adaLN, 76% (README).
        config.model.update(num_classes=0, cross_attention_dim=64, pooled_text=True)
        config.data.update(demo.data.to_dict())
        config.train.update(demo.train.to_dict())
        config.train.update(max_text_tokens=8, preview_num_images=50)  # captions are <= 7 pieces + </s>
        # Batch 12, not the class demo's 16: a text step costs ~1.3 class steps, and the outlines
        # need ~7,500 updates (batch 16 drew more of them right but took 17.6 min; README).
        config.train.update(batch_size=12, num_steps=7_500, preview_every=3_750)
        config.sample.update(batch_size=20, steps_per_stage=demo.sample.steps_per_stage,
                             cfg_scale=demo.sample.cfg_scale)
    elif arg:
        raise ValueError(f"unknown t2i config variant {arg!r}; choose '', 'tiny' or 'demo'")
    # Class-only settings, removed so that giving one is an error rather than silently unused:
    # captions drop out at train.caption_dropout, and captioned data is a folder or shards, not TFDS.
    del config.train["label_dropout"]
    for name in ("tfds_name", "tfds_data_dir", "split"):
        del config.data[name]
    return config
