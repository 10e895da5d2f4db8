"""``bimdist finetune``: MAE's fine-tuning protocol for a pretrained run's first K blocks, as a data-parallel job."""
