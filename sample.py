"""Sample from a trained checkpoint: python sample.py [ckpt=PATH] [sampler=dpmpp_2m] [steps=20] ..."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from diffusion.cli import sample

    sample(cfg)


if __name__ == "__main__":
    main()
