"""Fine-tune a small causal language model with Hugging Face's ``Trainer`` and partial JD.

``JDTrainer`` is ``Trainer`` with two more arguments: the considered module (here the output
layer, ``lm_head``) and the objectives (``"sequence"``: each sequence's mean token loss;
``"token"``: each token's loss). Everything else is ``Trainer``'s. The model is a tiny random GPT-2
(no download) trained on random token sequences with a learnable pattern, on the CPU in seconds.

    python examples/hf_trainer.py [--objectives token] [--steps 40]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from pjd_optim.integrations.transformers import JDTrainer


class Sequences(torch.utils.data.Dataset[dict[str, Tensor]]):
    """Sequences ``a, a+k, a+2k, ...`` modulo the vocabulary (predictable from two tokens)."""

    def __init__(self, count: int, length: int, vocab: int) -> None:
        generator = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (count, 1), generator=generator)
        step = torch.randint(1, 5, (count, 1), generator=generator)
        self.ids = (start + step * torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--objectives", choices=["sequence", "token"], default="sequence")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=31, n_positions=16, tie_word_embeddings=False
    )
    model = GPT2LMHeadModel(config)
    data = Sequences(256, 12, config.vocab_size)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=3e-3,
            logging_steps=max(1, args.steps // 4),
            report_to=[],
            save_strategy="no",
            use_cpu=True,
        )
        trainer = JDTrainer(
            model=model,
            args=training,
            train_dataset=data,
            considered=model.lm_head,
            objectives=args.objectives,
        )
        result = trainer.train()
    info = trainer.jd_optimizer.last_step if trainer.jd_optimizer else None
    print(f"final training loss {result.training_loss:.3f} ({args.objectives} objectives)")
    if info is not None:
        m = info.weights.numel()
        print(f"last step: {m} objectives, {100 * info.conflict:.0f}% of their pairs conflict")


if __name__ == "__main__":
    main()
