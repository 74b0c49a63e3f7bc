"""Run by the tests in a process of its own: builds a Kafka job's read path the way
``runners.flink_runner`` does (the job's environment with a bundle size of ``argv[1]``, the
decoder's SQL, ``EmitDecoded``), lets PyFlink configure its Python operators as ``execute``
would, and prints each Python operator's bundle settings as one JSON object
``{operator name: [bundle size, bundle time ms]}``. Nothing runs and no broker is needed."""
from __future__ import annotations

import json
import sys
import tempfile


def main(job_bundle_size: int) -> dict[str, list[str]]:
    from pyflink.common import Types
    from pyflink.java_gateway import get_gateway
    from pyflink.util.java_utils import load_java_class

    from pipelines.flink_kafka import EmitDecoded, kafka_decoder
    from runners.flink_runner import flink_environment
    from runners.kafka_source import BOUNDED_BUNDLE_MS, KafkaSourceConfig, connector_jar_uris, kafka_batches
    from schemas.spec import load_spec

    spec = load_spec("movielens")
    env = flink_environment(1, bundle_size=job_bundle_size, jars=connector_jar_uris(None))
    config = KafkaSourceConfig.from_uri("kafka://127.0.0.1:9")
    decoder = kafka_decoder(spec, config.topics, 2, tempfile.mkdtemp())
    (kafka_batches(env, spec, config, decoder, 16_384, None, BOUNDED_BUNDLE_MS)
     .process(EmitDecoded(), output_type=Types.PICKLED_BYTE_ARRAY()).name("emit decoded").print())
    j_env = env._j_stream_execution_environment
    get_gateway().jvm.org.apache.flink.python.util.PythonConfigUtil.configPythonOperator(j_env)
    python_operator = load_java_class("org.apache.flink.streaming.api.operators.python.AbstractPythonFunctionOperator")
    simple_factory = load_java_class("org.apache.flink.streaming.api.operators.SimpleOperatorFactory")
    transformations = {t.getId(): t for sink in j_env.getTransformations() for t in sink.getTransitivePredecessors()}
    settings = {}
    for transformation in transformations.values():
        try:
            factory = transformation.getOperatorFactory()
        except Exception:  # noqa: BLE001 (a source or a partitioning: no operator factory)
            continue
        if simple_factory.isInstance(factory) and python_operator.isInstance(factory.getOperator()):
            operator_config = factory.getOperator().getConfiguration()
            settings[transformation.getName()] = [operator_config.getString(f"python.fn-execution.bundle.{key}", None)
                                                  for key in ("size", "time")]
    return settings


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
