"""Released DiT / SiT weights as a checkpoint of this project: python convert.py src=FILE.pt out=FILE.ckpt
[format=auto|dit|sit] ['overrides=["vae=..."]'] [num_heads=N]; then sample.py ckpt=FILE.ckpt."""

import hydra
from omegaconf import DictConfig

from diffusion.runs import register_resolvers

register_resolvers()  # ${run_dir:...} in conf/train.yaml, which the converted run's config is composed from


@hydra.main(version_base="1.3", config_path="conf", config_name="convert")
def main(cfg: DictConfig) -> None:
    from diffusion.convert import convert

    convert(cfg)


if __name__ == "__main__":
    main()
