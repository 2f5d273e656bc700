"""Does the tail's rise slow down? For each run continued in /work/tail-exp (argument: its runs folder), validation
clean / PGD-10 accuracy's rise along the least-squares line through each 15-epoch block of the constant tail
(epochs 31-45, 46-60, and 61-75, 76-90 where the run went on to 90), and over the last third (the convergence rule's
figure, runs.validation_rise), each with its 95% interval (training.stats.fitted_rise), in points."""
import glob
import json
import sys

sys.path.insert(0, '/work/main')
from training.runs import validation_rise
from training.stats import fitted_rise


def cell(h, key):
    r = fitted_rise([e['epoch'] for e in h], [100 * e[key] for e in h])
    return f"{r.rise:+.1f} [{r.low:+.1f}, {r.high:+.1f}]"

def cells(h):
    return f"{cell(h, 'val_clean_acc')} / {cell(h, 'val_robust_acc')}"

def last_third(stage):
    """The rule's own figures (runs.validation_rise), in points."""
    rise = validation_rise({'stages': [stage]})
    return " / ".join(f"{100 * rise[key]:+.1f} [{100 * rise['ci95'][key][0]:+.1f}, {100 * rise['ci95'][key][1]:+.1f}]"
                      for key in ('val_clean_acc', 'val_robust_acc'))

if __name__ == '__main__':
    for d in sorted(glob.glob(f'{sys.argv[1]}/*/')):
        info = json.load(open(d + 'defense.json'))
        h = info['stages'][-1]['history']
        if not info['finished']:
            continue
        blocks = " | ".join(cells(h[a:a + 15]) for a in range(30, 90, 15) if len(h) >= a + 15)
        blocks += " | -" * (4 - blocks.count("|") - 1)
        print(f"| `{info['defense']}` ({len(h)}) | {blocks} | {last_third(info['stages'][-1])} |")
