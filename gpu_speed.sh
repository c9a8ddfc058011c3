#!/usr/bin/env bash
# The GPU speed of `train.py --preset taichi256` on one GPU, as a user runs it: the preset as shipped, each
# lever alone, and all of them; videos/s, tokens/s, MFU and peak memory from each run's last log line
# (steps 21-25: compilation is over), each fast path's first losses against the shipped run's, and the top
# costs of one profiled step. About 8 minutes on one H100; everything lands in OUT_DIR (table.md, logs).
#
#   bash gpu_speed.sh OUT_DIR                          # then set the preset's defaults to the best row
#   PRESET=latent_tiny STEPS=4 bash gpu_speed.sh /tmp/speed   # the script itself, on a CPU (some rows fail)
set -u
out=${1:?usage: bash gpu_speed.sh OUT_DIR}
preset=${PRESET:-taichi256}
steps=${STEPS:-25}
mkdir -p "$out"
rows=(
  "shipped|"
  "no checkpointing, batch 16|--no-checkpointing --batch-size 16"
  "fused AdamW|--speed fused"
  "compile each block|--speed compile"
  "FlexAttention, compiled|--speed flex,compile"
  "no FSDP (one GPU)|--no-fsdp"
  "all|--speed fused,compile,flex --no-checkpointing --batch-size 16"
)
for row in "${rows[@]}"; do
  name=${row%%|*}; flags=${row#*|}; dir="$out/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '_')"
  echo "== $name: $flags"
  # shellcheck disable=SC2086
  torchrun --standalone --nproc_per_node=1 train.py --preset "$preset" --data synthetic --steps "$steps" \
    --log-every 5 --ckpt-every 0 --out "$dir" $flags > "$dir.log" 2>&1 || echo "   failed: $(grep -m 1 -E '^error|Error' "$dir.log")"
done
python - "$out" "${rows[@]}" <<'EOF'
import json, os, re, sys
out, rows, table = sys.argv[1], [r.split("|") for r in sys.argv[2:]], []
def folder(name):
    return os.path.join(out, re.sub(r"[^a-zA-Z0-9]", "_", name))
def losses(name):
    try:
        return [(r["velocity"], r["rate"]) for r in map(json.loads, open(os.path.join(folder(name), "log.jsonl")))][:5]
    except OSError:
        return []
plain = losses(rows[0][0])
table.append("| run | flags | videos/s | tokens/s | MFU | peak GiB | first 5 losses vs shipped |")
table.append("|---|---|---|---|---|---|---|")
for name, flags in rows:
    lines = [l for l in open(folder(name) + ".log", errors="replace").read().replace("\r", "\n").splitlines()
             if l.lstrip().startswith("step ")]
    last = lines[-1] if lines else ""
    numbers = [(re.search(p, last) or [None, "-"])[1]
               for p in (r"([\d.]+) videos/s", r"([\d,]+) tokens/s", r"MFU ([\d.]+%)", r"([\d.]+) GiB")]
    mine = losses(name)
    worst = max((abs(a - b) / max(abs(b), 1e-8) for x, y in zip(mine, plain) for a, b in zip(x, y)), default=None)
    same = "-" if worst is None else f"{'same' if worst < 0.05 else 'DIFFERENT'} (max rel. diff {worst:.1e})"
    same = "(another batch)" if "--batch-size" in flags else same
    table.append(f"| {name} | `{flags or '(defaults)'}` | " + " | ".join(numbers) + f" | {same} |")
open(os.path.join(out, "table.md"), "w").write("\n".join(table) + "\n")
print("\n".join(table))
EOF
echo "== one profiled step of the shipped preset (top costs), also in $out/profile.txt"
python - "$preset" <<'EOF' | tee "$out/profile.txt"
import dataclasses, sys, torch, flowception as fc, train
from torch.profiler import ProfilerActivity, profile
cfg = dataclasses.replace(fc.PRESETS[sys.argv[1]], data="synthetic")
device = train.setup_distributed(fc.get_device(None), cfg.fsdp)
with torch.device(device):
    model = fc.build_model(cfg)
if cfg.fsdp:
    train.shard(model, device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
batch = train.global_batch(cfg, fc.KAPPAS[cfg.kappa](), torch.Generator().manual_seed(0))
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
for i in range(3):  # two warm-up steps, then the profiled one
    with profile(activities=activities) if i == 2 else torch.autocast("cpu", enabled=False) as prof:
        opt.zero_grad()
        train.forward_backward(model, model, batch, cfg, device, autocast)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
print(prof.key_averages().table(sort_by=f"{'cuda' if device.type == 'cuda' else 'cpu'}_time_total", row_limit=20))
EOF
