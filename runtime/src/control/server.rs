//! The node side of the control socket.
//!
//! One task per connection; each connection may carry many requests. A request that does not
//! parse, names an unknown command or version, or fails, gets `{"error": …}` and the connection
//! stays usable; a request over the size limit gets an error and the connection is closed (its
//! remaining bytes cannot be trusted to frame anything). The listener never stops for a bad client.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use colony_cluster::{Address, CallError};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use super::framing::{FramingError, read_frame, write_frame};
use super::protocol::{MAX_REQUEST_BYTES, PROTOCOL_VERSION, Request, Response, VersionedRequest};
use crate::node::{ActionName, Node, SYSTEM_ACTOR};

/// Creates the socket's directory (mode 0700) and binds the socket (mode 0600). A stale socket
/// file left by a dead node is replaced; a live one is an error.
pub async fn bind(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot restrict {}: {e}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(format!(
                "another node is already serving the control socket {}",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot bind control socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    Ok(listener)
}

/// Accepts connections until the listener fails.
pub async fn serve(listener: UnixListener, node: Arc<Node>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, node.clone()));
            }
            Err(e) => {
                warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(mut stream: UnixStream, node: Arc<Node>) {
    loop {
        let response = match read_frame(&mut stream, MAX_REQUEST_BYTES).await {
            Ok(None) => return,
            Ok(Some(bytes)) => answer(&bytes, &node).await,
            Err(e @ FramingError::TooLarge { .. }) => {
                let _ = send(&mut stream, &Response::Error(e.to_string())).await;
                return;
            }
            Err(FramingError::Io(e)) => {
                debug!("control connection ended: {e}");
                return;
            }
        };
        if send(&mut stream, &response).await.is_err() {
            return;
        }
    }
}

async fn send(stream: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(response).unwrap_or_else(|e| {
        format!(r#"{{"error":"cannot encode the response: {e}"}}"#).into_bytes()
    });
    write_frame(stream, &bytes).await
}

async fn answer(bytes: &[u8], node: &Node) -> Response {
    let value: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return Response::Error(format!("the request is not JSON: {e}")),
    };
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Response::Error(format!(
                "protocol version {v} is not supported; this node speaks {PROTOCOL_VERSION}"
            ));
        }
        None => return Response::Error("the request has no protocol version \"v\"".to_owned()),
    }
    let request: VersionedRequest = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => return Response::Error(format!("not a valid request: {e}")),
    };
    match handle(request.request, node).await {
        Ok(v) => Response::Ok(v),
        Err(e) => Response::Error(e),
    }
}

fn parse_address(s: &str) -> Result<Address, String> {
    s.parse::<Address>().map_err(|e| e.to_string())
}

async fn handle(request: Request, node: &Node) -> Result<serde_json::Value, String> {
    match request {
        Request::Status | Request::Tree => serde_json::to_value(node.cluster_status().await)
            .map_err(|e| format!("cannot encode the status: {e}")),
        Request::Send { address, message } => {
            let (to, body) = checked_target(node, &address, &message)?;
            node.cluster
                .send_raw(&to, Some(&ctl_address(node)), Bytes::from(body))
                .await
                .map_err(|e| e.to_string())?;
            Ok(serde_json::Value::Null)
        }
        Request::Call {
            address,
            message,
            timeout_ms,
        } => {
            let (to, body) = checked_target(node, &address, &message)?;
            let timeout = timeout_ms.map(Duration::from_millis);
            let reply = node
                .cluster
                .call_raw(&to, Some(&ctl_address(node)), Bytes::from(body), timeout)
                .await
                .map_err(|e: CallError| e.to_string())?;
            let value: ciborium::Value = ciborium::from_reader(reply.as_ref())
                .map_err(|e| format!("the reply does not decode: {e}"))?;
            let reply = serde_json::to_value(&value)
                .map_err(|e| format!("the reply is not JSON-shaped: {e}"))?;
            Ok(serde_json::json!({ "reply": reply }))
        }
        Request::Restart { address } => act(node, &address, ActionName::Restart).await,
        Request::Stop { address } => act(node, &address, ActionName::Stop).await,
        Request::Start { address } => act(node, &address, ActionName::Start).await,
        Request::Kill { address } => act(node, &address, ActionName::Kill).await,
        Request::Reload { source, dry_run } => {
            let report = node.reload_cluster(source, dry_run).await?;
            serde_json::to_value(report).map_err(|e| format!("cannot encode the report: {e}"))
        }
        Request::Reconfigure { address, settings } => {
            let report = node
                .reconfigure(&parse_address(&address)?, &settings)
                .await?;
            serde_json::to_value(report).map_err(|e| format!("cannot encode the report: {e}"))
        }
    }
}

async fn act(node: &Node, address: &str, action: ActionName) -> Result<serde_json::Value, String> {
    node.act(&parse_address(address)?, action)
        .await
        .map(|()| serde_json::Value::Null)
}

/// The address the control plane sends from.
fn ctl_address(node: &Node) -> Address {
    Address::new(node.name.clone(), "_ctl")
}

/// The target of a send or call, checked against the config, and the body: the message as the
/// target kind's own type (children of an actor take it as written).
fn checked_target(
    node: &Node,
    address: &str,
    message: &serde_json::Value,
) -> Result<(Address, Vec<u8>), String> {
    let to = parse_address(address)?;
    if to.actor() == SYSTEM_ACTOR {
        return Err(format!(
            "{to} is a system actor; use `colony ctl status` or an action command"
        ));
    }
    let actor = node.check_actor(&to)?;
    let body = if to.path().len() == 1 {
        colony_actors::encode_message(actor.kind(), message).map_err(|e| format!("{to}: {e}"))?
    } else {
        colony_cluster::encode_body(message).map_err(|e| e.to_string())?
    };
    Ok((to, body))
}
