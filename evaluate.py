"""Evaluate samples or a checkpoint: python evaluate.py samples=PATH | ckpt=PATH [metrics=[fid,kid]] [ref=...]"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> dict:
    from diffusion.evaluation.job import evaluate

    return evaluate(cfg)


if __name__ == "__main__":
    main()
