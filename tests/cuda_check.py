"""CUDA check (not collected by pytest; needs a GPU): python tests/cuda_check.py

The same flow and the same batches on the CPU and on CUDA:
  * Q(s, a), V(s) and the deterministic action, float64 and float32;
  * 50 updates (dropout off so both draw nothing random): CPU eager against CUDA eager and against
    CUDA compiled (--compile: CUDA graphs), loss and parameters after the last update;
  * 50 compiled updates with dropout on: finite.
Prints the differences and exits 1 if one is above its bound. CI has no GPU: run it where one is.
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ebflow_continuous_action as meow  # noqa: E402

OBS, ACT, B, UPDATES = 17, 6, 256, 50  # HalfCheetah-v4 shapes
failures = []


def check(label, diff, bound):
    print(f"{label}: {diff:.2e} (bound {bound:.0e})")
    if not diff <= bound:
        failures.append(label)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("error: torch sees no CUDA device")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    torch.manual_seed(0)
    base = meow.EBFlowPolicy(OBS, ACT, 0.25, -5.0, 2.0)
    obs, act = torch.randn(B, OBS), torch.rand(B, ACT) * 1.9 - 0.95

    # the paper's functions: relative to the largest value, 1e-12 in float64 and 1e-5 in float32
    for dtype, bound in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        on = {d: copy.deepcopy(base).to(d, dtype=dtype).eval() for d in (cpu, gpu)}
        o, a = obs.to(dtype), act.to(dtype)
        with torch.no_grad():
            for name, f in [("Q(s, a)", lambda m, d: m.soft_q(o.to(d), a.to(d))),
                            ("V(s)", lambda m, d: m.soft_v(o.to(d))),
                            ("deterministic action", lambda m, d: m.deterministic_action(o.to(d)))]:
                x, y = f(on[cpu], cpu), f(on[gpu], gpu).cpu()
                check(f"[{dtype}] {name}, max |cpu - cuda| / max |value|", ((x - y).abs().max() / x.abs().max()).item(), bound)

    # updates on the same batches, float32, dropout off
    args = meow.Args()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(B, OBS, generator=g), torch.rand(B, ACT, generator=g) * 2 - 1, torch.randn(B, generator=g),
                torch.randn(B, OBS, generator=g), (torch.rand(B, generator=g) < 0.05).float()) for _ in range(UPDATES)]
    runs = {}
    for name, device, compiled in (("cpu eager", cpu, False), ("cuda eager", gpu, False), ("cuda compiled", gpu, True)):
        flow, target = copy.deepcopy(base).to(device), copy.deepcopy(base).to(device).eval()
        flow.set_dropout(False)
        update, _, _ = meow.make_update(flow, target, args, compile=compiled)
        losses = torch.tensor([update([t.to(device) for t in b])[0].item() for b in batches])
        runs[name] = losses, torch.cat([p.detach().cpu().flatten() for p in flow.parameters()])
    ref_losses, ref_params = runs["cpu eager"]
    for name in ("cuda eager", "cuda compiled"):
        losses, params = runs[name]
        check(f"{name} vs cpu eager, loss after {UPDATES} updates, relative",
              (abs(losses[-1] - ref_losses[-1]) / abs(ref_losses[-1])).item(), 1e-4)
        check(f"{name} vs cpu eager, parameters after {UPDATES} updates, max abs diff",
              (params - ref_params).abs().max().item(), 1e-4)

    # compiled, dropout on: the random masks inside CUDA graphs
    flow, target = copy.deepcopy(base).to(gpu), copy.deepcopy(base).to(gpu).eval()
    update, _, skipped = meow.make_update(flow, target, args, compile=True)
    losses = torch.tensor([update([t.to(gpu) for t in b])[0].item() for b in batches])
    print(f"cuda compiled, dropout on: last loss {losses[-1]:.4f}, skipped updates {int(skipped.item())}")
    if not (torch.isfinite(losses).all() and skipped.item() == 0):
        failures.append("compiled updates with dropout")

    print("FAILED: " + "; ".join(failures) if failures else "all within bounds")
    sys.exit(1 if failures else 0)
