"""sd-scripts' ``ss_*`` training metadata, so A1111/ComfyUI/civitai show what a file was trained with.

Only base names of folders and models are recorded, never absolute paths (they reveal user names and Drive layout).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from pathlib import Path

from lycolab.config import TrainConfig
from lycolab.data.captions import split_tags
from lycolab.data.dataset import BucketedDataset


def _name(path: str | None) -> str | None:
    return Path(path).name if path else None


def tag_frequency(dataset: BucketedDataset) -> dict[str, dict[str, int]]:
    """Tag counts per image folder (``ss_tag_frequency``), as A1111's metadata viewer expects."""
    frequency: dict[str, Counter] = {}
    for item in dataset.items:
        folder = Path(item.record.subset.image_dir).name
        frequency.setdefault(folder, Counter()).update(split_tags(item.record.caption))
    return {folder: dict(counts) for folder, counts in frequency.items()}


def training_metadata(config: TrainConfig, dataset: BucketedDataset, session_id: str | None = None,
                      started_at: float | None = None) -> dict[str, str]:
    """Metadata fixed for the whole run; epoch/step keys are added per save."""
    first = config.datasets[0]
    buckets = {
        str(index): {"resolution": list(resolution), "count": count}
        for index, ((_, resolution), count) in enumerate(dataset.bucket_counts().items())
    }
    dataset_dirs = {}
    for item in dataset.items:
        entry = dataset_dirs.setdefault(Path(item.record.subset.image_dir).name,
                                        {"n_repeats": item.record.num_repeats, "img_count": 0})
        entry["img_count"] += 1
    values = {
        "ss_session_id": session_id or str(uuid.uuid4().int % 2**31),
        "ss_training_started_at": started_at or time.time(),
        "ss_output_name": config.output_name,
        "ss_learning_rate": config.learning_rate,
        "ss_unet_lr": config.unet_lr,
        "ss_text_encoder_lr": config.text_encoder_lr,
        "ss_num_train_images": sum(i.record.num_repeats for i in dataset.items if not i.record.is_reg),
        "ss_num_reg_images": sum(i.record.num_repeats for i in dataset.items if i.record.is_reg),
        "ss_num_batches_per_epoch": dataset.batches_per_epoch(),
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_max_train_steps": config.max_train_steps,
        "ss_lr_warmup_steps": config.lr_warmup_steps,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_optimizer": config.optimizer_type or "AdamW",
        "ss_mixed_precision": config.mixed_precision,
        "ss_v2": config.v2,
        "ss_base_model_version": "sd_v2" if config.v2 else "sd_v1",
        "ss_v_parameterization": config.v_parameterization,
        "ss_clip_skip": config.clip_skip,
        "ss_max_token_length": config.max_token_length,
        "ss_cache_latents": config.cache_latents,
        "ss_seed": config.seed,
        "ss_noise_offset": config.noise_offset,
        "ss_min_snr_gamma": config.min_snr_gamma,
        "ss_prior_loss_weight": config.prior_loss_weight,
        "ss_training_comment": config.training_comment,
        "ss_sd_model_name": _name(config.pretrained_model_name_or_path),
        "ss_vae_name": _name(config.vae),
        "ss_resolution": str(tuple(first.resolution)),
        "ss_enable_bucket": first.enable_bucket,
        "ss_min_bucket_reso": first.min_bucket_reso,
        "ss_max_bucket_reso": first.max_bucket_reso,
        "ss_bucket_no_upscale": first.bucket_no_upscale,
        "ss_keep_tokens": first.subsets[0].keep_tokens if first.subsets else 0,
        "ss_shuffle_caption": first.subsets[0].shuffle_caption if first.subsets else False,
        "ss_caption_dropout_rate": first.subsets[0].caption_dropout_rate if first.subsets else 0.0,
        "ss_bucket_info": json.dumps({"buckets": buckets}),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_tag_frequency": json.dumps(tag_frequency(dataset)),
    }
    return {key: str(value) for key, value in values.items() if value is not None}
