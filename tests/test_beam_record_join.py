"""The record-level reference join (pipelines.beam_record_join): a TestStream with hand-driven
watermarks, and the whole stage on created records."""
import json

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from pipelines.beam_io import DEAD
from pipelines.beam_record_join import JoinImpressionsWithActions, JoinSampleExtract
from schemas.spec import load_spec
from transforms.join import JoinConfig

CONFIG = JoinConfig(window_ms=1_000, label_actions=("click",), target="click")


def _ms(t_ms):
    return Timestamp(micros=t_ms * 1000)


def _imp(request_id, t_ms):
    return TimestampedValue(("impression", {"request_id": request_id, "item_id": "i", "event_time_ms": t_ms}),
                            _ms(t_ms))


def _act(request_id, t_ms):
    return TimestampedValue(("action", {"request_id": request_id, "item_id": "i", "action_type": "click",
                                        "event_time_ms": t_ms}), _ms(t_ms))


def test_stateful_join_with_hand_driven_watermarks():
    stream = (TestStream()
              .add_elements([_imp("a", 0), _imp("b", 200), _act("a", 500)])
              .advance_watermark_to(_ms(1_002))  # past a's window end (1000 ms) and its timer (1001 ms)
              .add_elements([_act("a", 900)])  # arrives after a's window closed: late
              .add_elements([_act("c", 1_500)])  # never gets an impression: orphan
              .advance_watermark_to(_ms(1_202))  # past b's window
              .add_elements([_act("b", 1_200)])  # exactly at b's window end, but after it closed: late
              .advance_watermark_to(_ms(2_600))  # past c's orphan timer (1500 + 1000 + 1)
              .advance_watermark_to_infinity())
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=options) as pipeline:
        result = pipeline | stream | JoinImpressionsWithActions(CONFIG)
        labels = result["joined"] | "Labels" >> beam.Map(lambda j: (j.impression["request_id"], j.labels["click"]))
        reasons = result[DEAD] | "Reasons" >> beam.Map(lambda d: (d.reason, json.loads(d.record.replace("'", '"'))
                                                                   ["request_id"] if d.record else ""))
        assert_that(labels, equal_to([("a", 1), ("b", 0)]), label="joined")
        assert_that(reasons, equal_to([("late_action", "a"), ("late_action", "b"), ("orphan_action", "c")]),
                    label="dead")


def test_record_level_stage_on_created_records():
    """JoinSampleExtract takes any PCollection of ("impression" | "action", record): here beam.Create."""
    def impression(request_id, t_ms, user):
        return ("impression", {"request_id": request_id, "user_id": user, "item_id": "m1", "event_time_ms": t_ms,
                               "position": 0, "age": 30, "gender": "F", "occupation": "writer", "zip_code": "1",
                               "release_year": 1990, "genres": ["Drama"]})

    events = [impression("r1", 0, "u1"), impression("r2", 10, "u2"),
              ("action", {"request_id": "r1", "item_id": "m1", "action_type": "like", "event_time_ms": 60_000}),
              ("action", {"request_id": "zz", "item_id": "m1", "action_type": "like", "event_time_ms": 5})]
    with beam.Pipeline() as pipeline:
        stamped = (pipeline | beam.Create(events)
                   | beam.Map(lambda e: TimestampedValue(e, _ms(e[1]["event_time_ms"]))))
        result = stamped | JoinSampleExtract(load_spec("movielens"))
        labelled = result["examples"] | "Labels" >> beam.Map(lambda ex: (ex["request_id"], dict(ex["labels"])["like"],
                                                                         len(ex["fids"]) > 0))
        assert_that(labelled, equal_to([("r1", 1, True), ("r2", 0, True)]), label="examples")
        assert_that(result[DEAD] | beam.Map(lambda d: d.reason), equal_to(["orphan_action"]), label="dead")
