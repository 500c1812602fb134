"""compare.py --check: every implementation against the fp64 literal reference on a scaled-down
copy of each case, before any timing (a fast wrong baseline would make a ratio meaningless)."""
from __future__ import annotations

import torch

import cases as C


def check(cases, impls, device, dtype, args) -> bool:
    """Each impl vs the fp64 literal reference on a scaled-down copy of each case (out and grads)."""
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    ok = True
    print(f"Correctness check at L={args.check_L} (fp64 reference; tolerance {tol:g} max abs):")
    opts = dict(device=device, dtype=dtype, mask_budget_gib=args.mask_budget_gib, max_dense_gflop=1e18,
                layout=args.baseline_layout)
    for case in cases:
        small = C.scaled_case(case, args.check_L)
        q, k, v, do = C.make_inputs(small, device, dtype, seed=1)
        qr, kr, vr = (x.detach().double().cpu().requires_grad_(True) for x in (q, k, v))
        ref = C.reference(small, qr, kr, vr)
        ref.backward(do.double().cpu())
        gref = [x.grad for x in (qr, kr, vr)]
        if "flex" in impls:  # the analytic BlockMask must equal torch's create_block_mask
            from torch.nn.attention.flex_attention import create_block_mask
            mine = C.make_block_mask(small, device=device)
            theirs = create_block_mask(C.make_mask_mod(small), None, small.H if small.family == "dilated" else None,
                                       small.L, small.L, device=device)
            same = torch.equal(mine.to_dense().expand_as(theirs.to_dense()), theirs.to_dense()) and torch.equal(
                mine.full_kv_num_blocks.expand_as(theirs.full_kv_num_blocks), theirs.full_kv_num_blocks)
            print(f"  {small.name:32s} {'blockmask':9s} " + ("same as create_block_mask" if same else "DIFFERS FAIL"))
            ok = ok and same
        for impl in impls:
            try:
                runner = C.build(impl, small, **opts)
            except C.Skip as e:
                print(f"  {small.name:32s} {impl:9s} skipped: {e}")
                continue
            msgs = []
            for mode in small.modes:
                if mode in runner.skip:
                    continue
                step = C.make_step(runner, mode, q, k, v, do)
                try:
                    out = step()
                except Exception as e:  # noqa: BLE001
                    msgs.append(f"{mode} error {type(e).__name__}: {str(e)[:100]}")
                    ok = False
                    continue
                err = (out.double().cpu() - ref.detach()).abs().max().item()
                good = err <= tol
                if mode == C.FWDBWD:
                    gerr = max((g.double().cpu() - gr).abs().max().item() / max(1.0, gr.abs().max().item())
                               for g, gr in zip((x.grad for x in step.leaves), gref))
                    good = good and gerr <= 5 * tol
                    msgs.append(f"{mode} out {err:.1e} grad {gerr:.1e}" + ("" if good else " FAIL"))
                else:
                    msgs.append(f"{mode} out {err:.1e}" + ("" if good else " FAIL"))
                ok = ok and good
            print(f"  {small.name:32s} {impl:9s} " + "; ".join(msgs), flush=True)
    print("check:", "OK" if ok else "FAILED", "\n", flush=True)
    return ok
