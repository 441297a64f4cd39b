"""Installs wa_tf: Winograd-aware quantized CNNs in Keras/TensorFlow."""
import setuptools

setuptools.setup(
    name="wa_tf",
    version="0.1.0",
    description="Winograd-aware quantized convolutional networks for tf_keras and TF-MOT.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["wa_tf", "wa_tf.*"]),
    # The fused kernels' sources, compiled on first use (wa_tf/kernels/__init__.py).
    package_data={"wa_tf.kernels": ["*.cc", "*.h", "int8/*.cc", "int8/*.h"]},
    scripts=["bin/train.py", "bin/adapt.py", "bin/export.py", "bin/evaluate.py", "bin/sweep.py",
             "bin/latency_table.py", "bin/search.py"],
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "tf-keras>=2.16,<2.22",  # must match tensorflow's minor version
        "tensorflow-model-optimization>=0.8.0",
        "tensorflow-datasets>=4.9",
        "numpy",
        "absl-py",
        "importlib_resources",  # needed by tensorflow-datasets' download path
        "tensorboard",  # tf.summary: the training logs
    ],
    extras_require={
        "test": ["pytest", "scikit-learn", "matplotlib", "ruff", "ai-edge-litert", "ncnn"],
        # LiteRT export runs with TensorFlow's tf.lite alone; ai-edge-litert is the runtime users ship.
        "deploy": ["ai-edge-litert"],
        "demo": ["scikit-learn"],
        "plot": ["matplotlib"],
        # bench/winograd_int8_bench.py's ncnn peer (optional: the bench skips it without).
        "bench": ["ncnn"],
    },
)
