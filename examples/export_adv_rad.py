"""Train AdvRAD (tiny), export its one-shot pipeline to OpenVINO and score a folder of images with OpenVINOInferencer.

    python examples/export_adv_rad.py --images path/to/folder          # embedded Fashion-MNIST, CPU preset
    python examples/export_adv_rad.py --images path/to/folder --max-steps 5 --results /tmp/export_demo

The exported graph draws its diffusion noise in the graph (AdvRAD paper, sec. 5.6: the randomness is part of the
defence), so scoring the same image twice gives slightly different scores, as in PyTorch. Scores are the
post-processed (normalised) image scores of anomalib. The same model and scoring from the command line:

    anomalib export --model AdvRAD --export_type openvino --ckpt_path <checkpoint> --default_root_dir exported
    anomalib predict --model AdvRAD --ckpt_path exported/weights/openvino/model.xml --data path/to/folder
"""

import argparse
from pathlib import Path

from anomalib.deploy import OpenVINOInferencer
from anomalib.engine import Engine

from anomalib_robust import AdvRAD
from anomalib_robust.data import FashionMNIST
from anomalib_robust.deploy import export_adv_rad

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of images to score")
    parser.add_argument("--max-steps", type=int, default=1500, help="training iterations")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--results", type=Path, default=Path("results"))
    arguments = parser.parse_args(argv)
    images = sorted(path for path in arguments.images.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        parser.error(f"--images {arguments.images} holds no {'/'.join(IMAGE_SUFFIXES)} files")

    datamodule = FashionMNIST(image_size=32, num_train=arguments.num_train, num_test=16, train_batch_size=16)
    model = AdvRAD.cpu_preset()
    engine = Engine(max_steps=arguments.max_steps, default_root_dir=arguments.results, logger=False)
    engine.fit(model, datamodule=datamodule)

    model_path = export_adv_rad(model, arguments.results / "exported", export_type="openvino")
    print(f"exported: {model_path}")
    # f32 on CPU: OpenVINO would otherwise pick bf16 where the CPU supports it (scores then differ by ~1e-2)
    inferencer = OpenVINOInferencer(path=model_path, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    for path in images:
        prediction = inferencer.predict(path)
        print(f"{path.name}: score={float(prediction.pred_score.squeeze()):.4f} label={bool(prediction.pred_label)}")


if __name__ == "__main__":
    main()
