"""``feddymem privacy-report runs/<name>``: run the attacks of :mod:`feddymem.privacy.attacks` on a finished run.

For one client of the run (its kept generator, its images, the run's memory settings) the report rebuilds
what the client uploads and attacks it, next to two references: the client's per-image embeddings (the
worst case) and the un-reduced bank (a greedy coreset of raw patches, ``memory.reduce=coreset``). More
uploads to compare (``--variant size=784,min_cluster_size=10``) reuse the same decoder and images.
It attacks the patch part of each item; a context part (``model.scoring.context``: means of whole windows of
patches, of as many images) travels beside it and is not attacked here.

Who plays which part: *members* are the client's training images (the memory is built from them);
*non-members* are images of the same products the memory never saw (the client's held-out normals and
other clients' training images); the server's *public* images, on which the decoder is trained, are the
normal test images of those products (no client trains on them).

Writes ``privacy/privacy.json``, ``privacy/privacy.md`` and ``privacy/inversion.png`` in the run folder.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.utils.data import DataLoader

from feddymem.config.settings import memory_reduce_settings
from feddymem.data.datasets import ImageDataset
from feddymem.data.products import Sample
from feddymem.errors import FedDyMemError
from feddymem.io import atomic_write_json, atomic_write_text, claim_output_dir, save_figure
from feddymem.logging.console import human_bytes
from feddymem.memory.reduce import MemoryBank, MemoryReduceSettings, reduce_memory
from feddymem.models.torch_model import FedDyMemModel
from feddymem.privacy.accountant import epsilon
from feddymem.privacy.attacks import image_windows, invert_images, invert_items, membership_auc, train_decoder


@dataclass
class UploadVariant:
    """One upload to attack: a memory-reduce and its settings (unset fields: the run's)."""

    name: str
    reduce: str | None = None
    size: int | None = None
    min_cluster_size: int | None = None
    noise_multiplier: float | None = None
    patches_per_image: int | None = None
    coreset_ratio: float | None = None
    min_images_per_item: int | None = None

    @classmethod
    def of_config(cls, name: str, cfg: Any) -> UploadVariant:
        """The upload a run of ``cfg`` makes (its memory-reduce and privacy settings)."""
        mem, privacy = cfg.memory, cfg.privacy
        return cls(
            name,
            mem.reduce.value,
            mem.size,
            mem.min_cluster_size,
            privacy.noise_multiplier,
            privacy.patches_per_image,
            mem.coreset_ratio,
            mem.min_images_per_item,
        )

    def settings(self, cfg: Any) -> MemoryReduceSettings:
        """The memory-reduce of this variant: the run's (``cfg``), with what this variant sets."""
        run = memory_reduce_settings(cfg)

        def pick(mine: Any, theirs: Any) -> Any:
            return theirs if mine is None else mine

        noise = replace(
            run.noise,
            noise_multiplier=pick(self.noise_multiplier, run.noise.noise_multiplier),
            patches_per_image=pick(self.patches_per_image, run.noise.patches_per_image),
        )
        return replace(
            run,
            method=pick(self.reduce, run.method),
            size=pick(self.size, run.size),
            min_cluster_size=pick(self.min_cluster_size, run.min_cluster_size),
            coreset_ratio=pick(self.coreset_ratio, run.coreset_ratio),
            min_images_per_item=pick(self.min_images_per_item, run.min_images_per_item),
            noise=noise,
        )

    @classmethod
    def parse(cls, text: str) -> UploadVariant:
        """``key=value,key=value`` (keys: the fields above but ``name``); the name is the text itself."""
        kinds = {f.name: f for f in dataclasses.fields(cls) if f.name != "name"}
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in kinds:
                raise FedDyMemError(f"variant '{text}': '{part}' is not one of {', '.join(f'{k}=…' for k in kinds)}")
            try:
                number = float if key in ("noise_multiplier", "coreset_ratio") else int
                values[key] = value if key == "reduce" else number(value)
            except ValueError:
                raise FedDyMemError(f"variant '{text}': '{value}' is not a number for {key}") from None
        return cls(text, **values)


@dataclass
class Embedded:
    """Images of one role: their embeddings (N, D, H, W), products, and pixels in [0, 1] when kept."""

    embeddings: torch.Tensor
    products: list[str]
    pixels: torch.Tensor | None = None


@torch.no_grad()
def embed_samples(
    model: FedDyMemModel, cfg: Any, samples: list[Sample], keep_pixels: bool = False, batch: int = 32
) -> Embedded:
    """Backbone + generator embeddings of ``samples`` (and their pixels in [0, 1] with ``keep_pixels``)."""
    extractor = model.feature_extractor
    dataset = ImageDataset(samples, cfg.data.image_size, cfg.data.crop_size, extractor.mean, extractor.std)
    mean = torch.tensor(extractor.mean).view(1, -1, 1, 1)
    std = torch.tensor(extractor.std).view(1, -1, 1, 1)
    out, pixels = [], []
    for b in DataLoader(dataset, batch_size=batch):
        out.append(model.embed(model.extract(b["image"])))
        if keep_pixels:
            pixels.append((b["image"] * std + mean).clamp(0, 1))
    return Embedded(torch.cat(out), [s.product for s in samples], torch.cat(pixels) if keep_pixels else None)


def _subsample(samples: list[Sample], count: int, seed: int) -> list[Sample]:
    if len(samples) <= count:
        return list(samples)
    picks = np.random.default_rng(seed).choice(len(samples), size=count, replace=False)
    return [samples[i] for i in sorted(picks.tolist())]


def matched_samples(
    members: list[Sample], others: list[Sample], count: int, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Up to ``count`` members and as many non-members, with the same number of each product on both sides:
    otherwise a reconstruction could look like the client's images only because the client holds more of
    one product than the unrelated set does."""
    by_product: dict[str, tuple[list[Sample], list[Sample]]] = {}
    for sample in members:
        by_product.setdefault(sample.product, ([], []))[0].append(sample)
    for sample in others:
        if sample.product in by_product:
            by_product[sample.product][1].append(sample)
    available = {p: min(len(m), len(o)) for p, (m, o) in by_product.items()}
    total = sum(available.values())
    scale = min(1.0, count / total) if total else 0.0
    chosen_members: list[Sample] = []
    chosen_others: list[Sample] = []
    for i, (product, (m, o)) in enumerate(sorted(by_product.items())):
        k = int(available[product] * scale)
        chosen_members += _subsample(m, k, seed + 2 * i)
        chosen_others += _subsample(o, k, seed + 2 * i + 1)
    return chosen_members, chosen_others


def build_upload(cfg: Any, embeddings: torch.Tensor, variant: UploadVariant, products: list[str]) -> MemoryBank:
    """The upload ``variant`` (the run's ``cfg`` where it sets nothing) makes from the members' embeddings
    (``products``: each member's product), as in round 0, before a client has a global memory."""
    settings = variant.settings(cfg)
    return reduce_memory(embeddings, settings, seed=cfg.seed, image_groups=products if settings.per_product else None)


@dataclass
class AttackSets:
    """The images of an attack, embedded with the client's kept generator: every member (they build the
    upload), the watched members, as many non-members of the same products, and the server's public images."""

    members: Embedded
    member_view: Embedded
    non_members: Embedded
    server: Embedded


def _attack_sets(
    model: FedDyMemModel, cfg: Any, client_id: int, run_dir: Path, attack_images: int, public_images: int, seed: int
) -> AttackSets:
    from feddymem.data.check import plan_data

    plan = plan_data(cfg)
    client = plan.clients[client_id]
    products = set(client.products)
    others = [s for c in plan.clients if c.client_id != client_id for s in c.train if s.product in products]
    public = [s for p in plan.products if p.name in products for s in p.test if s.label == 0]
    if not public or not (client.holdout or others):
        raise FedDyMemError(
            f"client {client_id} of {run_dir}: the attacks need normal test images of its products (the server's "
            "public images) and images of them the client does not hold (non-members)"
        )
    watched, unrelated = matched_samples(client.train, client.holdout + others, attack_images, seed)
    if not watched:
        raise FedDyMemError(f"client {client_id} of {run_dir}: no product has both members and non-members")
    members = embed_samples(model, cfg, client.train, keep_pixels=True)
    assert members.pixels is not None
    position = {s.path: i for i, s in enumerate(client.train)}
    picks = torch.tensor([position[s.path] for s in watched])
    return AttackSets(
        members,
        Embedded(members.embeddings[picks], [s.product for s in watched], members.pixels[picks]),
        embed_samples(model, cfg, unrelated, keep_pixels=True),
        embed_samples(model, cfg, _subsample(public, public_images, seed + 2), keep_pixels=True),
    )


def privacy_report(
    run_dir: str | Path,
    client_id: int = 0,
    variants: list[UploadVariant] | None = None,
    *,
    attack_images: int = 128,
    public_images: int = 96,
    seed: int = 0,
    own_upload: bool = True,
    decoder_steps: int = 0,
) -> dict[str, Any]:
    """Attack client ``client_id``'s uploads of the run in ``run_dir``; writes and returns the report.

    Rows: the per-image embeddings (a), the un-reduced bank (b), the run's own upload (c; unless
    ``own_upload`` is false) and every one of ``variants``, all made with the client's kept generator.

    ``attack_images``: members, and as many non-members, that reconstructions are matched to, whose per-image
    embeddings are inverted and that membership inference tells apart (the upload uses every member).
    ``public_images``: the server's images the decoder is trained on, for ``decoder_steps`` (0: 8 epochs,
    at least 400 steps).
    """
    from feddymem.trained import load_trained

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise FedDyMemError(f"no checkpoint at {checkpoint}: is {run_dir} a finished FedDyMem run?")
    trained = load_trained(checkpoint, client_id)
    model, cfg = trained.model.cpu().eval(), trained.config
    sets = _attack_sets(model, cfg, client_id, run_dir, attack_images, public_images, seed)
    uploads = [
        UploadVariant("un-reduced bank: coreset of raw patches (b)", reduce="coreset", noise_multiplier=0.0),
        *([UploadVariant(f"the run's upload (c): {cfg.memory.reduce.value}")] if own_upload else []),
        *(variants or []),
    ]
    rows, figures = _attack_rows(sets, cfg, uploads, seed, decoder_steps)
    cfg_noise = cfg.privacy
    members, member_view, non_members, server = sets.members, sets.member_view, sets.non_members, sets.server
    report = {
        "run_dir": str(run_dir),
        "client": client_id,
        "members": len(members.products),
        "attack_images": {
            "members": len(member_view.products),
            "non_members": len(non_members.products),
            "public": len(server.products),
        },
        "delta": cfg_noise.delta,
        "rows": rows,
        "time_s": time.perf_counter() - t0,
    }
    out = claim_output_dir(run_dir / "privacy", "privacy report folder")
    atomic_write_json(out / "privacy.json", report)
    atomic_write_text(out / "privacy.md", render_table(report))
    _draw(figures, out / "inversion.png")
    return report


def _attack_rows(
    sets: AttackSets, cfg: Any, uploads: list[UploadVariant], seed: int, decoder_steps: int
) -> tuple[list[dict[str, Any]], list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """A decoder trained on the server's public images attacks the per-image embeddings and every upload;
    membership inference runs on every upload. The table's rows and the inversion figure's panels."""
    members, member_view, non_members, server = sets.members, sets.member_view, sets.non_members, sets.server
    grid = (int(members.embeddings.shape[-2]), int(members.embeddings.shape[-1]))
    assert server.pixels is not None and member_view.pixels is not None and non_members.pixels is not None

    def pairs(view: Embedded) -> tuple[torch.Tensor, torch.Tensor]:
        assert view.pixels is not None
        return view.embeddings.flatten(2).transpose(1, 2).reshape(-1, view.embeddings.shape[1]), image_windows(
            view.pixels, grid
        ).flatten(0, 1)

    decoder = train_decoder(*pairs(server), seed=seed, steps=decoder_steps)
    _, member_windows = pairs(member_view)
    _, unrelated_windows = pairs(non_members)
    rows: list[dict[str, Any]] = []
    figures: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    per_image, recon = invert_images(decoder, member_view.embeddings, member_view.pixels, non_members.pixels)
    rows.append(_row("per-image embeddings (a)", None, per_image, float("nan"), None))
    figures.append(("per-image embeddings", member_view.pixels[:4], recon[:4]))
    for variant in uploads:
        bank = build_upload(cfg, members.embeddings, variant, members.products)
        result, reconstructions, matches = invert_items(decoder, bank.items, member_windows, unrelated_windows)
        auc = membership_auc(
            bank.items, member_view.embeddings, non_members.embeddings, member_view.products, non_members.products
        )
        sigma = variant.settings(cfg).noise.noise_multiplier
        eps = epsilon(sigma, bank.releases, cfg.privacy.delta) if bank.releases else None
        rows.append(_row(variant.name, bank, result, auc, eps))
        order = torch.randperm(len(reconstructions), generator=torch.Generator().manual_seed(seed))[:6]
        figures.append((variant.name, matches[order], reconstructions[order]))
    return rows, figures


def _row(name: str, bank: MemoryBank | None, result: Any, auc: float, eps: float | None) -> dict[str, Any]:
    return {
        "upload": name,
        "items": None if bank is None else int(bank.items.shape[0]),
        "patches_per_item": None if bank is None else float(bank.weights.mean()),
        "bytes": None if bank is None else bank.nbytes,
        "psnr": result.client.psnr,
        "psnr_floor": result.floor.psnr,
        "ssim": result.client.ssim,
        "ssim_floor": result.floor.ssim,
        "identified": result.identified,
        "p_value": result.p_value,
        "beats_floor": result.beats_floor,
        "membership_auc": auc,
        "epsilon": eps,
    }


def render_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    lines = [
        f"Client {report['client']} of `{report['run_dir']}` ({report['members']} training images); attack images: "
        f"{report['attack_images']['members']} members, {report['attack_images']['non_members']} non-members, "
        f"decoder trained on {report['attack_images']['public']} public images.",
        "",
        "| upload | items | patches / item | bytes | PSNR client (floor) | SSIM client (floor) | identified "
        "| inversion leaks? | membership AUC | ε |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['upload']} | {_num(r['items'])} | {_num(r['patches_per_item'], '.1f')} | "
            f"{human_bytes(r['bytes']) if r['bytes'] else '–'} | {r['psnr']:.2f} ({r['psnr_floor']:.2f}) | "
            f"{r['ssim']:.3f} ({r['ssim_floor']:.3f}) | {r['identified']:.2f} | "
            f"{'yes' if r['beats_floor'] else 'no'} | "
            f"{_num(r['membership_auc'], '.3f')} | {_num(r['epsilon'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def _num(value: Any, fmt: str = "d") -> str:
    if value is None or value != value:
        return "–"
    return format(value, fmt)


def _draw(figures: list[tuple[str, torch.Tensor, torch.Tensor]], path: Path) -> Path:
    """One block per attack: originals (or the closest client windows) above their reconstructions."""
    columns = max(len(a) for _, a, _ in figures)
    rows = 2 * len(figures)
    fig, axes = plt.subplots(
        rows, columns, figsize=(1.4 * columns, 1.55 * rows), squeeze=False, gridspec_kw={"hspace": 0.35, "wspace": 0.05}
    )
    for block, (title, originals, reconstructions) in enumerate(figures):
        for col in range(columns):
            for k, images in enumerate((originals, reconstructions)):
                ax = axes[2 * block + k, col]
                ax.axis("off")
                if col < len(images):
                    ax.imshow(images[col].permute(1, 2, 0).numpy().clip(0, 1), interpolation="nearest")
        axes[2 * block, 0].set_title(f"{title}: client's (top), reconstructed (bottom)", fontsize=7, loc="left")
    return save_figure(fig, path)
