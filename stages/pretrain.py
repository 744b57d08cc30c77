"""M0 pretrained by the project's own code: the ImageNet analog of the embedded demo.

The paper starts both stage1 and stage2 from ImageNet weights. The tiny net has none, so ``PIPELINE.WEIGHTS:
pretrain:<recipe>`` names a classification pretraining that builds them: the tiny body, RoI-style max pooling
and fc6/fc7 learn to tell the six shapes and background apart on crops (:mod:`roidb.crops`) of synthetic scenes
rendered with a seed of their own (:data:`PretrainRecipe.scene_seed`, never the demo set's 2015, so no test
image and no detection training image is seen). The result is a plain state dict (conv1..conv4, fc6, fc7) that
``PIPELINE.WEIGHTS`` would take from any path; ``pipeline.py pretrain`` builds it and prints where it is.

Cached like the dataset, built once per machine: ``<DATA_ROOT>/pretrained/<recipe>-<key>.pt`` with a manifest
(``.json``: recipe, key, the file's sha256, held-out accuracy, seconds), where ``key`` hashes the recipe, this
module's :data:`PRETRAIN_VERSION` and the scene generator's version. The training runs through the pipeline's
``train_loop`` in ``<DATA_ROOT>/pretrained/.work-<recipe>-<key>/`` (snapshots: a killed build resumes), under an
``fcntl`` lock so two runs never build the same file at once; the weights are renamed into place, the manifest
last. M0's digest in every fingerprint is the built file's sha256, as for any weights file.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from .engine.config import Config, SolverSettings, data_root
from .engine.errors import ConfigError
from .engine.paths import contained

__all__ = ["PRETRAIN_SCHEME", "PRETRAIN_VERSION", "PretrainRecipe", "RECIPES", "recipe_of", "recipe_key",
           "locate", "build"]

PRETRAIN_SCHEME = "pretrain:"
PRETRAIN_VERSION = "1"


@dataclass(frozen=True)
class PretrainRecipe:
    """One pretraining: the nets it serves (the same layers; the one trained is PIPELINE.NET), the scenes, the
    crops and the solver (step LR x0.1 at `stepsize`)."""
    nets: tuple[str, ...]
    scene_seed: int
    num_scenes: int
    crop_size: int
    batch_size: int
    fg_fraction: float
    iters: int
    lr: float
    stepsize: int
    momentum: float = 0.9
    weight_decay: float = 0.0005
    seed: int = 7
    num_eval_crops: int = 1024


# scene_seed 1507: any seed but the demo set's 2015 would do; 600 scenes hold about 2,000 non-difficult objects.
# 48-pixel crops put the object at 22-44 pixels, the scale where the demo loses most AP; lr 0.02 diverges.
RECIPES = {
    "tiny_shapes": PretrainRecipe(nets=("tiny", "tiny_s8"), scene_seed=1507, num_scenes=600, crop_size=48,
                                  batch_size=64, fg_fraction=0.75, iters=400, lr=0.01, stepsize=300),
}


def recipe_of(config: Config) -> tuple[str, PretrainRecipe] | None:
    """(name, recipe) when PIPELINE.WEIGHTS is ``pretrain:<name>``, None for a path or ''; ConfigError naming the
    key for an unknown recipe or one built for another net. PIPELINE.PRETRAIN_ITERS / PRETRAIN_SCENES, when not 0,
    replace the recipe's iterations (the LR steps at 3/4 of them) and scene count."""
    value = config.get("PIPELINE.WEIGHTS")
    if not value.startswith(PRETRAIN_SCHEME):
        return None
    name = value[len(PRETRAIN_SCHEME):]
    if name not in RECIPES:
        raise ConfigError(f"PIPELINE.WEIGHTS: unknown pretraining recipe {name!r} "
                          f"(known: {', '.join(PRETRAIN_SCHEME + n for n in RECIPES)})")
    recipe = RECIPES[name]
    if config.get("PIPELINE.NET") not in recipe.nets:
        raise ConfigError(f"PIPELINE.WEIGHTS: recipe {value} pretrains {' or '.join(recipe.nets)}, PIPELINE.NET is "
                          f"{config.get('PIPELINE.NET')}")
    iters, scenes = config.get("PIPELINE.PRETRAIN_ITERS"), config.get("PIPELINE.PRETRAIN_SCENES")
    recipe = replace(recipe, nets=(config.get("PIPELINE.NET"),))
    if iters:
        recipe = replace(recipe, iters=iters, stepsize=max(1, iters * 3 // 4))
    if scenes:
        if scenes < 10:
            raise ConfigError(f"config key PIPELINE.PRETRAIN_SCENES must be 0 (the recipe's {recipe.num_scenes}) or "
                              f"at least 10 (a tenth is held out), got {scenes}")
        recipe = replace(recipe, num_scenes=scenes)
    return name, recipe


def recipe_key(recipe: PretrainRecipe) -> str:
    """12 hex digits of sha256 over the recipe, PRETRAIN_VERSION and the scene generator's version."""
    from roidb.synthetic import GENERATOR_VERSION
    text = json.dumps({"recipe": asdict(recipe), "version": PRETRAIN_VERSION, "generator": GENERATOR_VERSION},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _paths(config: Config, name: str, recipe: PretrainRecipe) -> tuple[Path, Path, Path]:
    folder = data_root(config) / "pretrained"
    stem = f"{name}-{recipe_key(recipe)}"
    return folder / f"{stem}.pt", folder / f"{stem}.json", folder / f".work-{stem}"


_MAX_MANIFEST_BYTES = 1 << 20


def _read_manifest(path: Path) -> dict | None:
    """The manifest's dict; None when absent, unreadable, over 1 MiB or not a JSON object (the M0 is rebuilt)."""
    try:
        if path.stat().st_size > _MAX_MANIFEST_BYTES:
            return None
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _built(weights: Path, manifest_path: Path) -> dict | None:
    """The manifest when `weights` is there with the sha256 it records; None otherwise."""
    from .engine.artifacts import sha256_file
    manifest = _read_manifest(manifest_path)
    if manifest is None or not weights.is_file():
        return None
    return manifest if manifest.get("sha256") == sha256_file(weights) else None


def locate(config: Config) -> tuple[Path, str] | None:
    """(path, sha256) of the built M0 that PIPELINE.WEIGHTS's recipe names, or None when it is not built yet.
    Cheap (hashes the file; no torch)."""
    name, recipe = recipe_of(config)
    weights, manifest_path, _ = _paths(config, name, recipe)
    manifest = _built(weights, manifest_path)
    return None if manifest is None else (weights, manifest["sha256"])


def build(config: Config, echo: Callable[[str], None] = print) -> tuple[Path, dict]:
    """Build (or find) the M0 of PIPELINE.WEIGHTS's recipe; returns its path and manifest."""
    name, recipe = recipe_of(config)
    weights, manifest_path, work = _paths(config, name, recipe)
    contained(weights.parent).mkdir(parents=True, exist_ok=True)
    with open(contained(weights.parent / f".{name}.lock"), "a+") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel if this process dies
        manifest = _built(weights, manifest_path)
        if manifest is None:
            manifest = _train(name, recipe, weights, manifest_path, work, echo)
    return weights, manifest


def _train(name: str, recipe: PretrainRecipe, weights: Path, manifest_path: Path, work: Path,
           echo: Callable[[str], None]) -> dict:
    import torch

    from nets.backbones import PYFRCNN_PIXEL_MEANS, build_backbone, init_backbone
    from nets.pretrain import CropClassifier
    from roidb.crops import CropLoader, render_scenes
    from roidb.synthetic import SHAPE_CLASSES

    from .engine.artifacts import atomic_path, atomic_write_text, sha256_file
    from .engine.trainer import Reporter, save_torch, train_loop

    started = time.time()
    echo(f"M0: pretraining {recipe.nets[0]} on crops of {recipe.num_scenes} shapes scenes (seed {recipe.scene_seed}), "
         f"{recipe.iters} iterations of {recipe.batch_size} crops; built once, kept in {weights.parent}")
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    backbone = build_backbone(recipe.nets[0])
    init_backbone(backbone, generator)
    model = CropClassifier(backbone, len(SHAPE_CLASSES) + 1, generator)
    scenes = render_scenes(recipe.scene_seed, recipe.num_scenes)
    held_out = max(1, recipe.num_scenes // 10)
    loader = CropLoader(scenes[held_out:], crop_size=recipe.crop_size, batch_size=recipe.batch_size,
                        fg_fraction=recipe.fg_fraction, pixel_means=PYFRCNN_PIXEL_MEANS, seed=recipe.seed)

    def loss_fn(net, batch):
        blob, labels = batch
        logits = net(torch.from_numpy(blob))
        return {"cls": torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))}

    solver = SolverSettings(iters=recipe.iters, lr=recipe.lr, stepsize=recipe.stepsize, gamma=0.1,
                            momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                            snapshot_iters=min(100, max(1, recipe.iters // 4)))
    result = train_loop(model, loss_fn, loader, solver, work, reporter=Reporter(label="pretrain", echo=echo),
                        fingerprint=recipe_key(recipe))
    state = torch.load(result.model_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    accuracy = _accuracy(model, CropLoader(scenes[:held_out], crop_size=recipe.crop_size,
                                           batch_size=recipe.num_eval_crops, fg_fraction=recipe.fg_fraction,
                                           pixel_means=PYFRCNN_PIXEL_MEANS, seed=recipe.seed + 1))
    with atomic_path(weights) as tmp:
        save_torch(model.export_weights(), tmp)
    seconds = round(time.time() - started, 1)
    manifest = {"recipe": name, "key": recipe_key(recipe), "settings": asdict(recipe), "sha256": sha256_file(weights),
                "held_out_accuracy": accuracy, "seconds": seconds}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    echo(f"M0: pretrained in {seconds:.1f}s, held-out crop accuracy {accuracy['all']:.3f} "
         f"(objects {accuracy['objects']:.3f}, background {accuracy['background']:.3f}): {weights.name}")
    return manifest


def _accuracy(model, loader) -> dict[str, float]:
    """Top-1 accuracy on one batch of held-out crops (scenes the training never drew from)."""
    import torch
    model.eval()
    blob, labels = next(loader)
    with torch.no_grad():
        predicted = model(torch.from_numpy(blob)).argmax(1).numpy()
    model.train()
    right = predicted == labels
    fg = labels > 0
    return {"all": round(float(right.mean()), 4), "objects": round(float(right[fg].mean()), 4),
            "background": round(float(right[~fg].mean()), 4)}
