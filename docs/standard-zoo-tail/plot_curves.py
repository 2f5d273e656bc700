"""docs/standard-zoo-tail/validation-curves.png: validation clean and PGD-10 accuracy per epoch of the standard runs'
last stage, each at its longest continuation in /work/tail-exp (runs90/ over runs/), and `trades_ft` drawn on from
`trades`' 45 epochs (it starts from them: a second cosine cycle at lr 0.01), and `trades` with a 60-epoch anneal
(runs-anneal60/, exp4.sh, dashed). Grey lines: end of the anneal (30) and the 45- and 60-epoch presets' ends."""
import glob
import json
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def history(path):
    return json.load(open(path))['stages'][-1]['history']

runs = {}
for root in ('/work/tail-exp/runs', '/work/tail-exp/runs90'):
    for d in sorted(glob.glob(f'{root}/*/defense.json')):
        runs[os.path.basename(os.path.dirname(d)).split('-')[0]] = history(d)
runs['trades (30 + 60)'] = runs.pop('trades')
trades45 = history('/work/tail/runs/trades-standard-fashion_mnist-smallcnn/defense.json')
runs['trades_ft (on trades 45)'] = trades45 + [{**e, 'epoch': 45 + e['epoch']} for e in
                                              history('/work/tail/runs/trades_ft-standard-fashion_mnist-smallcnn/defense.json')]
runs['trades (60 + 30)'] = history('/work/tail-exp/runs-anneal60/trades-standard-fashion_mnist-smallcnn/defense.json')
fig = Figure(figsize=(11, 4.6))
FigureCanvasAgg(fig)
for column, (key, label) in enumerate((('val_clean_acc', 'clean'), ('val_robust_acc', 'PGD-10'))):
    ax = fig.add_subplot(1, 2, column + 1)
    for index, (name, h) in enumerate(sorted(runs.items())):
        ax.plot([e['epoch'] for e in h], [100 * e[key] for e in h], label=name, color=f'C{index}', linewidth=1,
                linestyle='--' if '60 + 30' in name else '-')
    for epoch in (30, 45, 60):
        ax.axvline(epoch, color='grey', linestyle=':', linewidth=1)
    ax.set_xlim(20, max(len(h) for h in runs.values()) + 1)
    ax.set_ylim(76 if key == 'val_clean_acc' else 66, 87 if key == 'val_clean_acc' else 80)
    ax.set_xlabel('epoch (last stage)')
    ax.set_ylabel(f'validation {label} accuracy % (1,000 images)')
    ax.grid(alpha=0.3)
    if column == 0:
        ax.legend(fontsize='x-small', loc='lower right')
fig.suptitle('Standard runs past the 30-epoch anneal: the tail at a tenth of the lr (2-core AMD EPYC)')
fig.tight_layout()
fig.savefig('/work/main/docs/standard-zoo-tail/validation-curves.png', dpi=100)
