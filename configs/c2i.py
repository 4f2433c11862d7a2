"""Class-conditional PixelFlow on ImageNet.

    --config=configs/c2i.py          PixelFlow-XL/4 as released: 16 heads x 72, depth 28, patch 4,
                                     1000 classes, 4 stages, 256 px (677M parameters)
    --config=configs/c2i.py:tiny     2 heads x 16, depth 2, 10 classes, 64 px: tests and smoke runs on a CPU
    --config=configs/c2i.py:demo     a small model trained on the built-in demo set on a CPU

Any value can be overridden on the command line, e.g. `--config.model.depth=12`.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Field names follow the release's config.yaml (model.params); see pixelflow_jax/config.py.
    config.model = ml_collections.ConfigDict(dict(
        num_attention_heads=16,
        attention_head_dim=72,
        depth=28,
        patch_size=4,
        in_channels=3,
        out_channels=3,
        num_classes=1000,
        attention_bias=True,
        cross_attention_dim=0,  # no text cross-attention
        dtype="bfloat16",  # compute dtype (the release trains and samples under bf16 autocast)
        param_dtype="float32",
        attention="auto",  # the fastest measured kernel for the platform (pixelflow_jax/kernels/attention.py)
        remat="none",  # 'full', 'dots' or 'dots_attention' trade compute for activation memory in training
        pooled_text=False,  # text models: also condition adaLN on the pooled caption (not the release's)
    ))
    config.scheduler = ml_collections.ConfigDict(dict(num_train_timesteps=1000, num_stages=4))
    # Training data (pixelflow_jax/data/loader.py): full-resolution uint8 images; stages are built on device.
    config.data = ml_collections.ConfigDict(dict(
        source="tfds",  # 'tfds' (ImageNet as ArrayRecord) | 'folder' (root/<class>/<image>) | 'demo'
        resolution=256,
        tfds_name="imagenet2012",
        tfds_data_dir="",  # '' = TFDS's default (~/tensorflow_datasets)
        split="train",
        root="",  # for source='folder'
        center_crop=False,  # False: the release's Lanczos resize to round(1.125 R) + random crop
        random_flip=True,  # the release's random horizontal flip (False: e.g. captions that say left or right)
        expand_ratio=1.125,
        num_workers=8,  # grain worker processes per host (0 = decode in the main process)
        prefetch_batches=2,  # batches read ahead (and decoded at once) per worker, or by the main process
        demo_num_images=20_000,
        demo_num_classes=10,
        demo_seed=0,
    ))

    # --mode=train (the default). The optimiser (AdamW at lr 1e-4, no weight decay, clip 1, EMA
    # 0.9999) and label dropout are the release's train.py; batch and length follow the paper's
    # ~1.6M iterations at batch ~256 (the release's config.yaml instead trains 10 epochs at 4 images
    # per GPU, a global 32 on its 8-GPU launch).
    config.train = ml_collections.ConfigDict(dict(
        batch_size=256,  # global; divisible by num_stages x devices x grad_accum_steps
        num_steps=1_600_000,
        lr=1e-4,
        lr_schedule="constant",  # the release's; 'cosine' decays to 0 at num_steps
        warmup_steps=0,  # linear ramp from 0 first
        weight_decay=0.0,
        grad_clip=1.0,
        ema_decay=0.9999,
        label_dropout=0.1,
        grad_accum_steps=1,
        log_every=100,
        checkpoint_every=5_000,
        keep_checkpoints=3,
        preview_every=20_000,  # 0 = no previews
        preview_num_images=16,
        preview_steps_per_stage=30,
        max_bad_steps=20,  # non-finite steps in a row before the run stops
        init_from="",  # a checkpoint to fine-tune from: a training run, a converted/release folder, hf://...
        init_from_weights="ema",  # of a training run (or a train.py checkpoint): 'ema' or 'model' (raw)
        allow_resume_changes=False,  # True: resume with another batch size, seed, lr or data (recorded)
        lock_stale_after_s=600.0,  # a workdir lock from another host without a heartbeat this long is stale
    ))
    config.mesh = ml_collections.ConfigDict(dict(fsdp=1))  # batch over data x fsdp; parameters over fsdp

    # --mode=sample. The architecture, stages and resolution come from the checkpoint; model.dtype,
    # model.param_dtype and model.attention above still apply. Defaults reproduce the release's FID run settings
    # (sample_ddp.py: 50k class-balanced images, cfg 2.4); its FID 1.98 used solver='dopri5'.
    config.sample = ml_collections.ConfigDict(dict(
        # A training run (its latest complete step) or RUN/checkpoints/STEP, a folder written by
        # convert_torch_ckpt.py, a release folder, or hf://OWNER/NAME[@REVISION][/SUBFOLDER].
        # Empty: the --workdir itself, when it is a training run.
        checkpoint="",
        weights="ema",  # of a training run (or a train.py checkpoint): 'ema' or 'model' (the raw weights)
        num_images=50_000,
        batch_size=64,  # global, divisible by the number of devices
        cfg_scale=2.4,
        steps_per_stage=ml_collections.FieldReference(30, field_type=object),  # int, or one per stage
        solver="euler",  # 'euler' | 'dopri5'
        shift=1.0,
        seed=0,
        # Class ids, one per image (a run on image folders also takes its folders' names, quoted);
        # empty: image i gets class i mod num_classes (mod the classes a training run learned where its data held
        # fewer: its class folders, or the class count its train_settings.json records).
        labels=(),
    ))

    # --mode=eval (and the end of --mode=sample when eval.reference is set): ADM's metrics.
    config.eval = ml_collections.ConfigDict(dict(
        samples="",  # .npz with arr_0 uint8 (N, H, W, 3); '': the workdir's samples.npz (a sampling job's)
        reference="",  # e.g. ADM's VIRTUAL_imagenet256_labeled.npz
        inception_weights="",  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth
        batch_size=100,  # images per Inception batch (rounded up to a multiple of the device count)
    ))

    # --mode=demo: the local web page (pixelflow_jax/demo_app.py); it samples config.sample.checkpoint.
    config.demo = ml_collections.ConfigDict(dict(
        port=7860,
        share_on_network=False,  # True: listen on every interface (0.0.0.0), not only this machine
        max_images=8,
    ))

    if arg == "tiny":
        config.model.update(num_attention_heads=2, attention_head_dim=16, depth=2, num_classes=10, dtype="float32")
        config.data.update(resolution=64, source="demo", num_workers=0)
        config.train.update(batch_size=8, num_steps=4, log_every=1, checkpoint_every=2, preview_every=0,
                            preview_steps_per_stage=3)
        config.sample.update(num_images=16, batch_size=8, steps_per_stage=3)
    elif arg == "demo":
        # The README's main job: a 1.3M-parameter model trained on the built-in demo set on a CPU
        # (measured times and agreements: README). 32 px with patch 4 keeps the token count small;
        # batch 16 gives the most updates in the time (outlines come with updates, not with bigger
        # batches); a constant rate (a cosine decay to 0 learned outlines more slowly); no crop
        # or resize (the set is already random in position and size, and a crop cuts shapes); cfg 6
        # because so briefly trained a model draws its outlines clearly only under strong guidance.
        config.model.update(num_attention_heads=4, attention_head_dim=32, depth=4, patch_size=4, num_classes=10,
                            dtype="float32")
        config.data.update(resolution=32, source="demo", center_crop=True, num_workers=1, demo_num_images=20_000,
                           demo_num_classes=10)
        config.train.update(batch_size=16, num_steps=7_000, lr=2e-3, ema_decay=0.998, log_every=100,
                            checkpoint_every=1_000, preview_every=3_500, preview_num_images=20,
                            preview_steps_per_stage=10)
        config.sample.update(num_images=100, batch_size=20, steps_per_stage=10, cfg_scale=6.0)
    elif arg:
        raise ValueError(f"unknown c2i config variant {arg!r}; choose '' (XL/4), 'tiny' or 'demo'")
    return config
