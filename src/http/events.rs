//! `GET /v1/events?topics=backingimages,volumes,...` (also snapshots, disks, nodes, settings): a server-sent event stream of the lists the
//! web UI shows, so a page follows ten images syncing to thirty disks without reloading or
//! polling each list itself. Each topic is read from the domain every [`EVERY`] and sent as an
//! event named after the topic (its data: the JSON the topic's `GET /v1/...` answers) when it
//! differs from what this stream sent last; the first read of each topic is always sent. A topic
//! that cannot be read (a node agent alone has no volumes) sends an `error` event
//! (`{"topic":..,"error":..}`) once per distinct message, and the stream goes on.
//!
//! It owns nothing but the stream: reading a topic goes through the same domain calls as the
//! list routes, and it must never write.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;

use super::{ApiResult, ApiState};
use crate::error::Error;

/// How often each topic is read.
pub const EVERY: Duration = Duration::from_millis(500);

/// The topics a stream can follow, as `topics=` names them.
pub const TOPICS: [&str; 6] = [
    "backingimages",
    "volumes",
    "snapshots",
    "disks",
    "nodes",
    "settings",
];

#[derive(serde::Deserialize)]
pub(super) struct EventsQuery {
    #[serde(default)]
    topics: Option<String>,
}

/// The topics asked for (all when none), each known, in the order given, without repeats.
fn parse_topics(text: Option<&str>) -> ApiResult<Vec<&'static str>> {
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(TOPICS.to_vec());
    };
    let mut out = Vec::new();
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let topic = TOPICS.iter().find(|t| **t == name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown event topic {name:?}; use some of: {}",
                TOPICS.join(", ")
            ))
        })?;
        if !out.contains(topic) {
            out.push(*topic);
        }
    }
    Ok(out)
}

/// The JSON a topic's list route answers.
async fn read(s: &ApiState, topic: &str) -> ApiResult<serde_json::Value> {
    Ok(match topic {
        "backingimages" => serde_json::to_value(s.backing()?.list()?)?,
        "volumes" => {
            let (volumes, _) = s.controller()?.list_volumes(0, "")?;
            serde_json::to_value(volumes)?
        }
        "snapshots" => {
            let (snapshots, _) = s.controller()?.list_snapshots(0, "", "", "")?;
            serde_json::to_value(snapshots)?
        }
        "disks" => serde_json::to_value(s.controller()?.cluster().disks().await?)?,
        "nodes" => serde_json::to_value(super::nodes(s)?)?,
        "settings" => serde_json::to_value(super::settings(s)?.list()?)?,
        other => {
            return Err(Error::InvalidArgument(format!(
                "unknown event topic {other:?}"
            )));
        }
    })
}

/// What one stream sent last of each topic (its data, or its error message).
struct Sent {
    s: ApiState,
    topics: Vec<&'static str>,
    last: HashMap<&'static str, Result<String, String>>,
    /// Events read but not sent yet (one read of all topics gives several).
    queue: std::collections::VecDeque<Event>,
    first: bool,
}

impl Sent {
    /// Reads every topic once and queues an event for each one that changed.
    async fn poll(&mut self) {
        for &topic in &self.topics {
            let now = match read(&self.s, topic).await {
                Ok(v) => Ok(v.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if self.last.get(topic) == Some(&now) {
                continue;
            }
            let event = match &now {
                Ok(data) => Event::default().event(topic).data(data.as_str()),
                Err(message) => Event::default()
                    .event("error")
                    .data(serde_json::json!({ "topic": topic, "error": message }).to_string()),
            };
            self.queue.push_back(event);
            self.last.insert(topic, now);
        }
    }
}

pub(super) async fn stream(
    State(s): State<ApiState>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let topics = parse_topics(q.topics.as_deref())?;
    let sent = Sent {
        s,
        topics,
        last: HashMap::new(),
        queue: Default::default(),
        first: true,
    };
    let events = futures::stream::unfold(sent, |mut sent| async move {
        loop {
            if let Some(e) = sent.queue.pop_front() {
                return Some((Ok(e), sent));
            }
            if !sent.first {
                tokio::time::sleep(EVERY).await;
            }
            sent.first = false;
            sent.poll().await;
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::parse_topics;

    #[test]
    fn topics() {
        assert_eq!(parse_topics(None).unwrap().len(), 6);
        assert_eq!(parse_topics(Some(" ")).unwrap().len(), 6);
        assert_eq!(
            parse_topics(Some("volumes, backingimages,volumes")).unwrap(),
            vec!["volumes", "backingimages"]
        );
        let e = parse_topics(Some("volumes,nope")).unwrap_err().to_string();
        assert!(e.contains("\"nope\"") && e.contains("backingimages"), "{e}");
    }
}
