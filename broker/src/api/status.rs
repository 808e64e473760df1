//! The dev-mode status page at `/status`: nodes, GPUs, pools and sessions at a glance, refreshed
//! every two seconds. Dev mode only: it shows the fleet without asking for a key.

use axum::extract::State;
use axum::response::Html;

use super::ApiState;

/// `GET /status`.
pub(super) async fn page(State(state): State<ApiState>) -> Html<String> {
    let broker = &state.broker;
    let (nodes, pools) = broker.with_engine(|e| (e.node_views(), e.pool_views()));
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
         <title>Framecast dev status</title><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <style>body{font:14px system-ui,sans-serif;margin:2em}\
         table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}\
         th{background:#f4f4f4}</style></head><body><h1>Framecast dev</h1>\
         <p><a href=\"/\">Player page</a>: play a session in this browser.</p>",
    );
    html.push_str(&format!(
        "<p>Region <b>{}</b>. API at <code>/v1</code>, contract at <a href=\"/openapi.json\">/openapi.json</a>, metrics at <a href=\"/metrics\">/metrics</a>.</p>",
        escape(broker.config().region.as_str())
    ));
    html.push_str("<h2>Sessions</h2><table><tr>");
    let counts = broker.session_counts();
    for (state, _) in &counts {
        html.push_str(&format!("<th>{state}</th>"));
    }
    html.push_str("</tr><tr>");
    for (_, n) in &counts {
        html.push_str(&format!("<td>{n}</td>"));
    }
    html.push_str("</tr></table><h2>Pools</h2><table><tr><th>region</th><th>tier</th><th>free</th><th>warm</th><th>reserved</th><th>active</th><th>queued</th></tr>");
    for p in &pools {
        html.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(p.region.as_str()),
            escape(p.tier.as_str()),
            p.free,
            p.warm,
            p.reserved,
            p.active,
            p.queued
        ));
    }
    html.push_str("</table><h2>Nodes</h2><table><tr><th>node</th><th>state</th><th>link</th><th>GPU</th><th>model</th><th>profile</th><th>sessions / slots</th><th>warm</th><th>framebuffer used</th></tr>");
    for n in &nodes {
        let state = if n.suspect {
            "suspect".to_owned()
        } else {
            n.state.to_string()
        };
        let link = if broker.connected(&n.node_id) {
            "up"
        } else {
            "down"
        };
        for g in &n.gpus {
            html.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{link}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{}</td><td>{} / {} MB</td></tr>",
                escape(n.node_id.as_str()),
                escape(&state),
                escape(g.gpu.as_str()),
                escape(&g.model),
                escape(g.profile.as_deref().unwrap_or("-")),
                g.sessions,
                g.slots,
                g.warm,
                g.framebuffer_used_mb,
                g.framebuffer_mb
            ));
        }
    }
    html.push_str("</table></body></html>");
    Html(html)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
