"""ELECTRA: a small generator and a discriminator trained together by replaced-token detection.

The generator (``ElectraForMaskedLM``, a fraction of the discriminator's width) fills the masked
positions; its sample replaces them; the discriminator (``ElectraForPreTraining``) tells, at
every real token, whether it was replaced. Two loss terms go to the loop (``train/objectives.py``):
the generator's MLM loss summed over the masked tokens and the discriminator's binary loss summed
over the real tokens, weighted 1 and ``discriminator_weight`` (50, as in the paper).

Both networks share one embeddings module (token, position, type embeddings and their
LayerNorm); the generator projects from the shared ``embedding_size`` down to its own width.

The generator's sample at a masked position is Gumbel-max with noise drawn from a
``torch.Generator`` seeded per *sample* by (seed, epoch, sample index) (``sample_seed``): the same
sample gets the same replacement on whichever rank, micro-batch or row it lands, so split
invariance and exact resume hold as for the masking itself.

What is saved is two ordinary folders: ``discriminator/`` (``ElectraForPreTraining``, what one
fine-tunes) and ``generator/`` (``ElectraForMaskedLM``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hetlm.errors import HetlmError
from hetlm.models.masked_lm import masked_logits, summed_mlm_loss

PARTS = ("discriminator", "generator")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The generator-sampling seed of one sample: a hash of (seed, epoch, index), < 2**63."""
    digest = hashlib.blake2b(f"electra:{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def generator_config(discriminator_config, fraction: float):
    """The generator's config: ``fraction`` of the discriminator's hidden size, heads and MLP
    width, the same depth, and the discriminator's ``embedding_size`` (shared embeddings)."""
    import transformers

    if not 0.0 < fraction <= 1.0:
        raise HetlmError(f"model.generator_fraction must be in (0, 1], got {fraction}")
    disc = discriminator_config
    heads = max(1, round(disc.num_attention_heads * fraction))
    head_dim = max(1, round(disc.hidden_size * fraction / heads))
    values = disc.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        values.pop(key, None)
    values.update(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        intermediate_size=max(1, round(disc.intermediate_size * fraction)),
        embedding_size=disc.embedding_size,
    )
    return transformers.ElectraConfig(**values)


def share_embeddings(discriminator: nn.Module, generator: nn.Module) -> None:
    """Make the generator use the discriminator's embeddings module (and tie its output layer
    to the shared word embeddings, as ``ElectraForMaskedLM`` ties it to its own)."""
    disc_emb = discriminator.electra.embeddings
    gen_emb = generator.electra.embeddings
    shapes = {n: p.shape for n, p in disc_emb.named_parameters()}
    if shapes != {n: p.shape for n, p in gen_emb.named_parameters()}:
        raise HetlmError(
            "the ELECTRA generator's embeddings do not match the discriminator's "
            "(vocabulary or embedding_size differ): they must share one embedding "
            "table; use a generator saved with this discriminator"
        )
    generator.electra.embeddings = disc_emb
    generator.generator_lm_head.weight = disc_emb.word_embeddings.weight


class ElectraPair(nn.Module):
    """The discriminator and the generator as one module: what the engine wraps and saves.

    ``save_pretrained`` writes ``dir/discriminator`` and ``dir/generator``, each loadable on its
    own by ``transformers``; ``artifact_subdirs`` tells ``save_final`` to put the tokenizer in
    both and ``load_model_weights`` to resume each from its folder.
    """

    artifact_subdirs = PARTS

    def __init__(self, discriminator: nn.Module, generator: nn.Module) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.generator = generator
        share_embeddings(discriminator, generator)

    @property
    def config(self):
        return self.discriminator.config

    def get_input_embeddings(self) -> nn.Module:
        return self.discriminator.get_input_embeddings()

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        safe_serialization: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Each part into its folder; ``state_dict`` (the pair's, as the engine gathered it) is
        split by the part prefixes."""
        state = state_dict if state_dict is not None else self.state_dict()
        for part in PARTS:
            prefix = f"{part}."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            getattr(self, part).save_pretrained(
                Path(save_directory) / part,
                safe_serialization=safe_serialization,
                state_dict=own,
                **kwargs,
            )


def build_electra_pair(discriminator_config, fraction: float) -> ElectraPair:
    """A fresh pair (the caller seeds the initialisation)."""
    import transformers

    discriminator = transformers.ElectraForPreTraining(discriminator_config)
    generator = transformers.ElectraForMaskedLM(generator_config(discriminator_config, fraction))
    return ElectraPair(discriminator, generator)


def is_electra_output(folder: Path) -> bool:
    return all((folder / part / "config.json").is_file() for part in PARTS)


def load_electra_pair(source: str, overrides: dict[str, Any]) -> ElectraPair:
    """The pair from a hetlm ELECTRA output folder (``discriminator/`` + ``generator/``)."""
    import transformers

    folder = Path(source)
    if not is_electra_output(folder):
        raise HetlmError(
            f"model.init_from {source} is not a hetlm ELECTRA output folder (with "
            "discriminator/ and generator/ each holding config.json): point it at "
            "a run's model/ folder or one of its checkpoints"
        )
    parts = {}
    for part, cls in zip(
        PARTS, (transformers.ElectraForPreTraining, transformers.ElectraForMaskedLM), strict=True
    ):
        config = transformers.AutoConfig.from_pretrained(folder / part)
        if config.model_type != "electra":
            raise HetlmError(
                f"{folder / part} holds a {config.model_type!r} model, not an "
                "ELECTRA one: point model.init_from at a hetlm ELECTRA output"
            )
        parts[part] = cls.from_pretrained(folder / part, dtype=torch.float32, **overrides)
    return ElectraPair(parts["discriminator"], parts["generator"])


def gumbel_sample(logits: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """One token per slot from softmax(logits): argmax(logits + Gumbel noise), the noise of row
    b drawn from a generator seeded by ``seeds[b]`` (independent of the other rows).

    ``logits``: [batch, slots, vocab]; returns [batch, slots] token ids.
    """
    batch, slots, vocab = logits.shape
    noise = torch.empty(batch, slots, vocab, device=logits.device, dtype=torch.float32)
    for row, seed in enumerate(seeds.tolist()):
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(int(seed))
        noise[row].uniform_(generator=generator)
    gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))
    return (logits.detach().float() + gumbel).argmax(-1)


class ElectraObjective(nn.Module):
    """Replaced-token detection: forward gives ([mlm, rtd] summed losses, [mlm, rtd] correct)."""

    loss_terms = ("mlm", "rtd")

    def __init__(self, model: ElectraPair, discriminator_weight: float = 50.0) -> None:
        super().__init__()
        self.model = model
        self.loss_weights = (1.0, float(discriminator_weight))

    def corrupt(
        self,
        input_ids: torch.Tensor,
        masked_positions: torch.Tensor,
        masked_labels: torch.Tensor,
        sampled: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(discriminator input, replaced labels): the original ids with each masked position
        holding the generator's sample; label 1 where the sample differs from the original."""
        real_slot = masked_labels != -100
        original = input_ids.clone()
        keep = input_ids.gather(1, masked_positions)
        original.scatter_(1, masked_positions, torch.where(real_slot, masked_labels, keep))
        replaced = original.clone()
        replaced.scatter_(
            1,
            masked_positions,
            torch.where(real_slot, sampled, original.gather(1, masked_positions)),
        )
        return replaced, (replaced != original).float()

    def generate(
        self,
        input_ids: torch.Tensor,
        masked_positions: torch.Tensor,
        masked_labels: torch.Tensor,
        sample_seeds: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The generator's step: (its vocabulary logits at the masked slots [b, slots, vocab],
        the discriminator's input [b, seq], the replaced labels [b, seq])."""
        logits = masked_logits(self.model.generator, input_ids, masked_positions, attention_mask)
        with torch.no_grad():
            sampled = gumbel_sample(logits, sample_seeds)
            replaced, labels = self.corrupt(input_ids, masked_positions, masked_labels, sampled)
        return logits, replaced, labels

    def forward(
        self,
        input_ids: torch.Tensor,
        masked_positions: torch.Tensor,
        masked_labels: torch.Tensor,
        sample_seeds: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, replaced, labels = self.generate(
            input_ids, masked_positions, masked_labels, sample_seeds, attention_mask
        )
        mlm_loss, mlm_correct = summed_mlm_loss(logits, masked_labels)
        discriminator = self.model.discriminator
        hidden = discriminator.electra(
            input_ids=replaced, attention_mask=attention_mask
        ).last_hidden_state
        disc_logits = discriminator.discriminator_predictions(hidden).float()  # [b, seq]
        real = attention_mask.bool()
        rtd_loss = F.binary_cross_entropy_with_logits(
            disc_logits[real], labels[real], reduction="sum"
        )
        with torch.no_grad():
            rtd_correct = ((disc_logits[real] > 0).float() == labels[real]).sum()
        return torch.stack([mlm_loss, rtd_loss]), torch.stack([mlm_correct, rtd_correct])
