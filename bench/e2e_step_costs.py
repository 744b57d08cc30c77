"""Interleaved per-iteration cost of each training step kind (same process, same moment, same contention).

Used to give configs/shapes_end2end.yml the wall budget of configs/default.yml: python3 bench/e2e_step_costs.py
(needs a finished default run for the stage2/stage4 proposals; set P2 below)."""
import time, torch, numpy as np
from pathlib import Path
from stages.engine.config import load_config
from stages.settings import load_imdb, build_model
from stages.training import rpn_roidb_for_training, frcn_roidb_for_training, make_loader, rpn_loss_fn, frcn_loss_fn
from stages.joint import make_e2e_loader, e2e_loss_fn
from nets import set_trainable, param_groups
P2 = Path("output/shapes_tiny_alt_opt/p2/proposals.pkl")
cfg = load_config("configs/default.yml", [])
imdb = load_imdb(cfg)
K = imdb.num_classes
kinds = {}
def setup(stage, loader, fn):
    m = build_model(cfg, K); set_trainable(m, stage)
    if stage in ("stage2", "stage4"): m.set_bbox_normalization(*frcn[1:])
    opt = torch.optim.SGD(param_groups(m, 0.001, 0.0005), momentum=0.9)
    kinds[stage] = (m, iter(loader), fn, opt)
rpn_rdb = rpn_roidb_for_training(cfg, imdb)
setup("stage1", make_loader(cfg, rpn_rdb, K, True), rpn_loss_fn(cfg))
setup("stage3", make_loader(cfg, rpn_roidb_for_training(cfg, load_imdb(cfg)), K, True), rpn_loss_fn(cfg))
frcn = frcn_roidb_for_training(cfg, load_imdb(cfg), P2)
setup("stage2", make_loader(cfg, frcn[0], K, False), frcn_loss_fn())
setup("stage4", make_loader(cfg, frcn[0], K, False), frcn_loss_fn())
setup("e2e", make_e2e_loader(cfg, rpn_roidb_for_training(cfg, load_imdb(cfg)), K), e2e_loss_fn(cfg))
cost = {k: [] for k in kinds}
for rnd in range(4):
    for k, (m, it, fn, opt) in kinds.items():
        t = time.perf_counter()
        for _ in range(5):
            b = next(it); l = fn(m, b); opt.zero_grad(); sum(l.values()).backward(); opt.step()
        cost[k].append((time.perf_counter() - t) / 5)
iters = {"stage1": 100, "stage2": 540, "stage3": 680, "stage4": 280, "e2e": 1400}
for k in kinds:
    print(f"{k}: {np.median(cost[k]):.3f} s/iter (median of 4 blocks of 5) x {iters[k]} = {np.median(cost[k]) * iters[k]:.0f} s")
alt = sum(np.median(cost[k]) * iters[k] for k in ("stage1", "stage2", "stage3", "stage4"))
print(f"alt-opt training loops {alt:.0f} s; e2e {np.median(cost['e2e']) * 1400:.0f} s; ratio e2e/alt {np.median(cost['e2e']) * 1400 / alt:.2f}")
