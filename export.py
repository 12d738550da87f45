"""Export a checkpoint's EMA weights: python export.py [ckpt=PATH] [out=DIR] -> ema.safetensors + config.yaml."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from diffusion.cli import export

    export(cfg)


if __name__ == "__main__":
    main()
