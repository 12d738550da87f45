"""Train a diffusion model: python train.py [group=option ...] [key=value ...] (see conf/)."""

import hydra
from omegaconf import DictConfig

from diffusion.runs import register_resolvers

register_resolvers()  # ${run_dir:...} in conf/train.yaml: ckpt_path=last continues the newest run in place


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from diffusion.cli import train

    train(cfg)


if __name__ == "__main__":
    main()
