"""The paper's base-to-new protocol on one dataset, for Skip Tuning and its baselines.

    python python/base_to_new.py --data ~/data --dataset oxford_pets --model ViT-B-16 \\
        --pretrained /path/to/ViT-B-16.pt --modes skip,ft,coop --seeds 1,2,3

Writes <out>/<mode>-seed<seed>/results.json per run and prints base / new / HM averaged over seeds.
"""
import argparse
import statistics

from skipkernels.skip.tuner import SkipConfig
from skipkernels.train.trainer import TrainConfig, protocol_epochs
from skipkernels.train.job import finetune


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--modes", default="skip")
    parser.add_argument("--skip-layers", type=int, default=None, help="omega (default: half the blocks, 6 for ViT-B/16)")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--out", default="runs/base_to_new")
    args = parser.parse_args()

    epochs = protocol_epochs(args.dataset, 20)  # 20, or 5 for ImageNet / SUN397 / Food101
    for mode in args.modes.split(","):
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            results = finetune(args.data, args.dataset, args.model, args.pretrained,
                               SkipConfig(mode=mode, skip_layers=args.skip_layers, seed=seed),
                               TrainConfig(epochs=epochs, seed=seed), out_dir=f"{args.out}/{mode}-seed{seed}")
            rows.append(results["accuracy"])
        mean = {k: statistics.mean(r[k] for r in rows) for k in ("base", "new", "hm")}
        print(f"{mode:>6}: base {mean['base']:.2f}  new {mean['new']:.2f}  HM {mean['hm']:.2f}")


if __name__ == "__main__":
    main()
