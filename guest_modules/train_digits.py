"""Train the `inference:digits` model on scikit-learn's bundled 8x8 digits; write its weights.

    python guest_modules/train_digits.py [--kind logreg|mlp] [--out PATH] [--test-csv PATH]

No download: `sklearn.datasets.load_digits` ships inside scikit-learn. The
split is fixed (`train_test_split(test_size=0.25, random_state=0,
stratify=y)`), so the held-out digits are the same on every run.

Model file format ("dense classifier", all little-endian):

    offset  size            field
    0       8               magic b"ANVDENS1"
    8       4   u32         n_layers (1..8)
    12      4   u32         n_classes
    16      8   f64         input_scale: every feature is multiplied by it first
    24      4*n_classes i32 class labels, in output order
    then, per layer:
            4   u32         n_in   (layer 1: number of features; then the
                                    previous layer's n_out)
            4   u32         n_out  (last layer: n_classes)
            4   u32         activation: 0 = identity, 1 = ReLU
            8*n_out*n_in    f64 weights W, row-major [n_out][n_in]
            8*n_out         f64 biases b
    end of file (trailing bytes are an error)

A layer maps x to act(W x + b); the prediction is the label of the largest
last-layer output (the first one on ties, like numpy.argmax). A multinomial
logistic regression is one identity layer; a one-hidden-layer MLP is a ReLU
layer then an identity layer (softmax does not change the argmax).

Image input format of the module: UTF-8 text, one image per non-blank line,
`n_features` (64) comma-separated numbers, pixel intensities 0..16 in
row-major order, exactly as in `load_digits().data`.
"""

from __future__ import annotations

import argparse
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

MAGIC = b"ANVDENS1"
ACTIVATIONS = {"identity": 0, "relu": 1}
INPUT_SCALE = 1.0 / 16.0  # digits pixels are 0..16; the weights are fitted on 0..1
SPLIT_SEED = 0


@dataclass(frozen=True, kw_only=True)
class Layer:
    weights: NDArray[np.float64]  # [n_out, n_in]
    biases: NDArray[np.float64]  # [n_out]
    activation: str


@dataclass(frozen=True, kw_only=True)
class DenseModel:
    input_scale: float
    labels: tuple[int, ...]
    layers: tuple[Layer, ...]

    def predict(self, features: NDArray[np.float64]) -> NDArray[np.int64]:
        """Labels for a [n, n_features] array, by the same arithmetic as the guest."""
        x = features * self.input_scale
        for layer in self.layers:
            x = x @ layer.weights.T + layer.biases
            if layer.activation == "relu":
                x = np.maximum(x, 0.0)
        return np.asarray(self.labels, dtype=np.int64)[np.argmax(x, axis=1)]


@dataclass(frozen=True, kw_only=True)
class Split:
    x_train: NDArray[np.float64]
    x_test: NDArray[np.float64]
    y_train: NDArray[np.int64]
    y_test: NDArray[np.int64]


def digits_split() -> Split:
    """The fixed train/held-out split of the bundled digits (1347 / 450 images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.25, random_state=SPLIT_SEED, stratify=data.target
    )
    return Split(x_train=x_train, x_test=x_test, y_train=y_train, y_test=y_test)


def train(split: Split, kind: str = "logreg") -> tuple[DenseModel, Any]:
    """Fit a multinomial logistic regression ("logreg") or a 32-unit ReLU MLP ("mlp").

    Returns the model and the fitted scikit-learn estimator it was read from
    (which predicts on features already multiplied by `INPUT_SCALE`).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    x = split.x_train * INPUT_SCALE
    with warnings.catch_warnings():
        # An unconverged fit is still a valid model; the accuracy check is what counts.
        warnings.simplefilter("ignore", ConvergenceWarning)
        if kind == "logreg":
            clf: Any = LogisticRegression(C=10.0, max_iter=2000).fit(x, split.y_train)
            layers = (Layer(weights=clf.coef_, biases=clf.intercept_, activation="identity"),)
        elif kind == "mlp":
            clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=400, random_state=0)
            clf.fit(x, split.y_train)
            layers = (
                Layer(weights=clf.coefs_[0].T, biases=clf.intercepts_[0], activation="relu"),
                Layer(weights=clf.coefs_[1].T, biases=clf.intercepts_[1], activation="identity"),
            )
        else:
            raise ValueError(f"unknown model kind {kind!r} (logreg or mlp)")
    model = DenseModel(
        input_scale=INPUT_SCALE,
        labels=tuple(int(c) for c in clf.classes_),
        layers=tuple(
            Layer(
                weights=np.ascontiguousarray(layer.weights, dtype=np.float64),
                biases=np.ascontiguousarray(layer.biases, dtype=np.float64),
                activation=layer.activation,
            )
            for layer in layers
        ),
    )
    return model, clf


def encode_model(model: DenseModel) -> bytes:
    """The model in the format described at the top of this file."""
    out = bytearray(MAGIC)
    out += struct.pack("<IId", len(model.layers), len(model.labels), model.input_scale)
    out += struct.pack(f"<{len(model.labels)}i", *model.labels)
    for layer in model.layers:
        n_out, n_in = layer.weights.shape
        out += struct.pack("<III", n_in, n_out, ACTIVATIONS[layer.activation])
        out += layer.weights.astype("<f8").tobytes()
        out += layer.biases.astype("<f8").tobytes()
    return bytes(out)


def decode_model(data: bytes) -> DenseModel:
    """Parse a model file; raises ValueError when it is malformed."""
    if data[:8] != MAGIC:
        raise ValueError("not a dense classifier model (bad magic)")
    n_layers, n_classes, scale = struct.unpack_from("<IId", data, 8)
    pos = 24
    labels = struct.unpack_from(f"<{n_classes}i", data, pos)
    pos += 4 * n_classes
    names = {v: k for k, v in ACTIVATIONS.items()}
    layers = []
    for _ in range(n_layers):
        n_in, n_out, act = struct.unpack_from("<III", data, pos)
        pos += 12
        weights = np.frombuffer(data, "<f8", n_out * n_in, pos).reshape(n_out, n_in)
        pos += 8 * n_out * n_in
        biases = np.frombuffer(data, "<f8", n_out, pos)
        pos += 8 * n_out
        layers.append(Layer(weights=weights, biases=biases, activation=names[act]))
    if pos != len(data):
        raise ValueError("trailing bytes after the last layer")
    return DenseModel(input_scale=scale, labels=labels, layers=tuple(layers))


def images_csv(features: NDArray[np.float64]) -> bytes:
    """Images in the module's input format: one line of 64 comma-separated values each."""
    return "".join(",".join(f"{v:g}" for v in row) + "\n" for row in features).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kind", choices=("logreg", "mlp"), default="logreg")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "models" / "digits-logreg.bin"
    )
    parser.add_argument("--test-csv", type=Path, help="also write the held-out images here")
    args = parser.parse_args(argv)
    split = digits_split()
    model, _ = train(split, args.kind)
    accuracy = float(np.mean(model.predict(split.x_test) == split.y_test))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(encode_model(model))
    if args.test_csv is not None:
        args.test_csv.write_bytes(images_csv(split.x_test))
    print(
        f"{args.kind}: held-out accuracy {accuracy:.4f} ({len(split.y_test)} images) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
