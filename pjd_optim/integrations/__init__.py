"""Integrations with training frameworks (optional dependencies, imported on demand):
``pjd_optim.integrations.transformers.JDTrainer`` (Hugging Face ``Trainer``)."""
