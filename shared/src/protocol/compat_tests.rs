//! Wire compatibility between builds: a newer peer's additions must not break an older one.

use ciborium::Value;
use proptest::prelude::*;

use super::*;
use crate::ids::{GpuId, SessionId};
use crate::state::{EndReason, SessionState};
use crate::time::Timestamp;

fn to_value(message: &Message) -> Value {
    let mut bytes = Vec::new();
    ciborium::into_writer(message, &mut bytes).unwrap();
    ciborium::from_reader(bytes.as_slice()).unwrap()
}

fn encode_value(value: &Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    ciborium::into_writer(value, &mut bytes).unwrap();
    bytes
}

/// Adds `extra` under a key no build knows to every map in `value`, as a newer peer that added
/// a field to every struct would.
fn add_field_everywhere(value: &mut Value, extra: &Value) {
    match value {
        Value::Map(entries) => {
            for (_, v) in entries.iter_mut() {
                add_field_everywhere(v, extra);
            }
            entries.push((
                Value::Text("added_in_a_later_version".into()),
                extra.clone(),
            ));
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| add_field_everywhere(v, extra)),
        Value::Tag(_, inner) => add_field_everywhere(inner, extra),
        _ => {}
    }
}

fn arbitrary_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|i| Value::Integer(i.into())),
        any::<bool>().prop_map(Value::Bool),
        ".{0,16}".prop_map(Value::Text),
        proptest::collection::vec(any::<u8>(), 0..16).prop_map(Value::Bytes),
        Just(Value::Null),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((".{0,8}".prop_map(Value::Text), inner), 0..4)
                .prop_map(Value::Map),
        ]
    })
}

proptest! {
    /// An older build decodes a newer peer's message with extra fields in every struct, and
    /// sees the message it knows.
    #[test]
    fn extra_fields_anywhere_are_ignored(message in any::<Message>(), extra in arbitrary_value()) {
        let mut value = to_value(&message);
        add_field_everywhere(&mut value, &extra);
        prop_assert_eq!(decode_message(&encode_value(&value))?, message);
    }
}

#[test]
fn an_unknown_message_type_decodes_as_unknown() {
    let value = Value::Map(vec![
        (
            Value::Text("type".into()),
            Value::Text("gpu-firmware-report".into()),
        ),
        (
            Value::Text("firmware".into()),
            Value::Text("96.00.5E.00.01".into()),
        ),
    ]);
    assert_eq!(
        decode_message(&encode_value(&value)).unwrap(),
        Message::Unknown
    );
}

#[test]
fn unknown_reasons_decode_as_other() {
    let session_id = SessionId::new(Timestamp::from_millis(1), 7);
    let rejected = Message::Rejected(Rejected {
        request_id: 1,
        session_id,
        reason: RejectReason::NoCapacity,
        detail: String::new(),
    });
    let mut value = to_value(&rejected);
    set_text(&mut value, "reason", "thermal-throttle");
    let Message::Rejected(r) = decode_message(&encode_value(&value)).unwrap() else {
        panic!("not a rejection")
    };
    assert_eq!(r.reason, RejectReason::Other);

    let bye = Message::Goodbye(Goodbye {
        reason: GoodbyeReason::Shutdown,
        message: "bye".into(),
    });
    let mut value = to_value(&bye);
    set_text(&mut value, "reason", "maintenance-window");
    let Message::Goodbye(g) = decode_message(&encode_value(&value)).unwrap() else {
        panic!("not a goodbye")
    };
    assert_eq!(g.reason, GoodbyeReason::Other);
}

#[test]
fn absent_optional_fields_read_as_none() {
    // A GpuUsage from a sender that never sets the utilisation fields leaves them out.
    let heartbeat = Message::Heartbeat(Heartbeat {
        generation: 3,
        seq: 9,
        sent_at: Timestamp::from_millis(5),
        gpus: vec![GpuUsage {
            gpu: GpuId::new("sim-0").unwrap(),
            free_framebuffer: crate::units::Megabytes::new(4096),
            free_encoder: crate::units::EncoderUnits::ONE,
            encoder_utilization_pct: Some(40),
            gpu_utilization_pct: Some(60),
            vgpus: Some(3),
            profile: None,
        }],
        warm: None,
        plan_generation: None,
        inputs: Vec::new(),
    });
    let mut value = to_value(&heartbeat);
    let Value::Map(top) = &mut value else {
        panic!("map")
    };
    let (_, Value::Array(gpus)) = top
        .iter_mut()
        .find(|(k, _)| k.as_text() == Some("gpus"))
        .unwrap()
    else {
        panic!("gpus")
    };
    let Value::Map(gpu) = &mut gpus[0] else {
        panic!("map")
    };
    gpu.retain(|(k, _)| !k.as_text().is_some_and(|k| k.ends_with("_pct")));
    let Message::Heartbeat(hb) = decode_message(&encode_value(&value)).unwrap() else {
        panic!("not a heartbeat")
    };
    assert_eq!(hb.gpus[0].encoder_utilization_pct, None);
    assert_eq!(hb.gpus[0].gpu_utilization_pct, None);
}

#[test]
fn a_hello_from_an_agent_that_does_not_report_draining_reads_as_not_draining() {
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "0.1.0".into(),
        node_id: crate::ids::NodeId::new("gpu-1").unwrap(),
        region: crate::ids::RegionName::new("eu").unwrap(),
        generation: 4,
        gpus: Vec::new(),
        sessions: Vec::new(),
        warm: Vec::new(),
        cpu_millicores: None,
        whep_url: None,
        draining: Some(Timestamp::from_millis(1_700_000_600_000)),
    };
    let mut value = to_value(&Message::Hello(hello.clone()));
    let Value::Map(entries) = &value else {
        panic!("map")
    };
    let draining = entries
        .iter()
        .find(|(k, _)| k.as_text() == Some("draining"))
        .map(|(_, v)| v.clone());
    assert_eq!(
        draining,
        Some(Value::Integer(1_700_000_600_000_u64.into())),
        "the deadline travels as Unix milliseconds"
    );
    assert_eq!(
        decode_message(&encode_value(&value)).unwrap(),
        Message::Hello(hello.clone())
    );
    // An agent built before the field leaves it out.
    let Value::Map(entries) = &mut value else {
        panic!("map")
    };
    entries.retain(|(k, _)| k.as_text() != Some("draining"));
    let Message::Hello(old) = decode_message(&encode_value(&value)).unwrap() else {
        panic!("not a hello")
    };
    assert_eq!(old.draining, None);
    assert_eq!(
        old,
        Hello {
            draining: None,
            ..hello
        }
    );
}

#[test]
fn the_wire_shape_is_a_map_tagged_by_type() {
    let release = Message::Release(Release {
        session_id: SessionId::new(Timestamp::from_millis(1_700_000_000_000), 1),
        reason: EndReason::NodeLost,
    });
    let value = to_value(&release);
    let Value::Map(entries) = &value else {
        panic!("map")
    };
    let keys: Vec<&str> = entries.iter().filter_map(|(k, _)| k.as_text()).collect();
    assert_eq!(keys, ["type", "session_id", "reason"]);
    assert_eq!(entries[0].1.as_text(), Some("release"));
    assert_eq!(entries[2].1.as_text(), Some("node-lost"));
    let update = to_value(&Message::SessionUpdate(SessionUpdate {
        generation: 1,
        session_id: SessionId::new(Timestamp::from_millis(1), 1),
        state: SessionState::Ended(EndReason::Expired),
        at: Timestamp::from_millis(2),
    }));
    let Value::Map(entries) = &update else {
        panic!("map")
    };
    let state = &entries
        .iter()
        .find(|(k, _)| k.as_text() == Some("state"))
        .unwrap()
        .1;
    assert_eq!(
        state,
        &Value::Map(vec![
            (Value::Text("state".into()), Value::Text("ended".into())),
            (Value::Text("reason".into()), Value::Text("expired".into())),
        ])
    );
}

fn set_text(value: &mut Value, key: &str, text: &str) {
    let Value::Map(entries) = value else {
        panic!("map")
    };
    for (k, v) in entries.iter_mut() {
        if k.as_text() == Some(key) {
            *v = Value::Text(text.into());
        }
    }
}
