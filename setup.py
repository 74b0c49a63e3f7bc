"""streamrec: real-time recommendation training as a Beam / Flink streaming job."""
from setuptools import find_packages, setup

LAYERS = ["schemas", "event_datasets", "transforms", "trainer", "serving", "experiments", "pipelines", "runners", "bench"]

setup(
    name="streamrec",
    version="0.1.0",
    description="Monolith-style online training (collisionless embeddings, streaming join, "
    "parameter sync) and CowClip large-batch CTR training on Apache Beam and Apache Flink.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=[f"{layer}*" for layer in LAYERS]),
    package_data={"schemas": ["avro/*.avsc", "specs/*.yaml"]},
    install_requires=[
        # The streaming engines. apache-flink 2.3.0 pins apache-beam 2.61.0 and with it
        # numpy < 2.2, pyarrow < 17 and protobuf 5: the one set that installs side by side.
        "apache-flink==2.3.0",
        "apache-beam==2.61.0",
        # Embedding table, models and optimizers (the same code on CPU and CUDA).
        "torch==2.13.0",
        # Event logs (Avro) and columnar outputs / snapshots (Arrow, Parquet).
        "fastavro>=1.9",
        # The column-wise Avro decoder's varint loop (schemas.avro_columns), compiled.
        "numba>=0.60",
        "pyarrow>=14,<17",
        "numpy>=1.24,<2.2",
        # Feature specs.
        "PyYAML>=6",
        # Training reports: the metrics plot (PNG) and the progress bar.
        "matplotlib>=3.7",
        "tqdm>=4.60",
        # Serving: the HTTP predict API.
        "fastapi>=0.110",
        "uvicorn>=0.29",
        # The external row store (Redis; hiredis parses replies in C).
        "redis[hiredis]>=5,<6",
        # Kafka: streamrec produce (librdkafka). The Flink connector's jars and a broker for tests
        # are fetched by make (runners.kafka_assets), not installed.
        "confluent-kafka>=2.4,<3",
    ],
    extras_require={
        # scikit-learn is the reference the metric tests compare against; ruff the linter make test runs.
        "test": ["pytest>=8", "hypothesis>=6.100", "scikit-learn>=1.3", "httpx>=0.27", "ruff>=0.5"],
        # bench.quality's online-learning peer (Vowpal Wabbit) and its exact AUC.
        "bench": ["vowpalwabbit>=9.9,<10", "scikit-learn>=1.3"],
    },
    entry_points={"console_scripts": ["streamrec=runners.cli:main"]},
)
