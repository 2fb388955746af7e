//! The client side of the control socket: one request, one response, bounded in time.
//!
//! Each call opens its own connection, so a client that gives up (timeout, Ctrl-C) leaves nothing
//! half-read behind for the next request.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::net::UnixStream;

use super::framing::{read_frame, write_frame};
use super::protocol::{MAX_RESPONSE_BYTES, PROTOCOL_VERSION, Request, Response, VersionedRequest};

/// Sends `request` to the node serving `socket` and returns what it answered; the whole exchange
/// (connect, write, read) is bounded by `timeout`.
pub async fn request(
    socket: &Path,
    request: Request,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    match tokio::time::timeout(timeout, exchange(socket, request)).await {
        Ok(result) => result,
        Err(_) => Err(anyhow!(
            "the node's control socket {} did not answer within {}",
            socket.display(),
            describe_timeout(timeout)
        )),
    }
}

async fn exchange(socket: &Path, request: Request) -> anyhow::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| connect_error(socket, &e))?;
    let bytes = serde_json::to_vec(&VersionedRequest {
        v: PROTOCOL_VERSION,
        request,
    })
    .context("cannot encode the request")?;
    write_frame(&mut stream, &bytes)
        .await
        .with_context(|| format!("cannot send the request to {}", socket.display()))?;
    let Some(frame) = read_frame(&mut stream, MAX_RESPONSE_BYTES)
        .await
        .with_context(|| format!("cannot read the answer from {}", socket.display()))?
    else {
        bail!(
            "the node closed its control socket {} without answering",
            socket.display()
        );
    };
    let response: Response = serde_json::from_slice(&frame).with_context(|| {
        format!(
            "the answer on {} is not a control-protocol response",
            socket.display()
        )
    })?;
    match response {
        Response::Ok(value) => Ok(value),
        Response::Error(e) => Err(anyhow!(e)),
    }
}

/// "cannot reach …: No such file or directory — is the node running?", without the OS error
/// number, which tells a user nothing more.
fn connect_error(socket: &Path, e: &std::io::Error) -> anyhow::Error {
    let text = e.to_string();
    let reason = text.split(" (os error").next().unwrap_or(&text);
    let hint = match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            " — is the node running?"
        }
        std::io::ErrorKind::PermissionDenied => " — is the node run by another user?",
        _ => "",
    };
    anyhow!(
        "cannot reach the node's control socket {}: {reason}{hint}",
        socket.display()
    )
}

fn describe_timeout(timeout: Duration) -> String {
    if timeout.subsec_millis() == 0 {
        format!("{} s", timeout.as_secs())
    } else {
        format!("{} ms", timeout.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::framing::read_frame as server_read;
    use crate::control::protocol::MAX_REQUEST_BYTES;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_missing_socket_is_named_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let err = runtime()
            .block_on(request(&path, Request::Status, Duration::from_secs(1)))
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(
            text.contains("No such file or directory — is the node running?"),
            "{text}"
        );
        assert!(!text.contains("os error"), "{text}");
    }

    /// A fake node that answers each request with `answer` after checking what it received.
    fn serve_once(
        path: &Path,
        answer: &'static [u8],
        expect: Request,
    ) -> tokio::task::JoinHandle<()> {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let frame = server_read(&mut stream, MAX_REQUEST_BYTES)
                .await
                .unwrap()
                .unwrap();
            let got: VersionedRequest = serde_json::from_slice(&frame).unwrap();
            assert_eq!(
                got,
                VersionedRequest {
                    v: PROTOCOL_VERSION,
                    request: expect
                }
            );
            write_frame(&mut stream, answer).await.unwrap();
        })
    }

    #[test]
    fn ok_and_error_responses_map_to_results() {
        let dir = tempfile::tempdir().unwrap();
        runtime().block_on(async {
            let ok = dir.path().join("ok.sock");
            let server = serve_once(&ok, br#"{"ok":{"reply":7}}"#, Request::Status);
            let value = request(&ok, Request::Status, Duration::from_secs(2))
                .await
                .unwrap();
            assert_eq!(value, serde_json::json!({"reply": 7}));
            server.await.unwrap();

            let bad = dir.path().join("err.sock");
            let kill = Request::Kill {
                address: "a/b".into(),
            };
            let server = serve_once(&bad, br#"{"error":"no actor a/b"}"#, kill.clone());
            let err = request(&bad, kill, Duration::from_secs(2))
                .await
                .unwrap_err();
            assert_eq!(err.to_string(), "no actor a/b");
            server.await.unwrap();

            let junk = dir.path().join("junk.sock");
            let server = serve_once(&junk, b"[1,2]", Request::Tree);
            let err = request(&junk, Request::Tree, Duration::from_secs(2))
                .await
                .unwrap_err();
            assert!(
                err.to_string().contains("not a control-protocol response"),
                "{err}"
            );
            server.await.unwrap();
        });
    }

    #[test]
    fn a_silent_node_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        runtime().block_on(async {
            let _listener = tokio::net::UnixListener::bind(&path).unwrap();
            let err = request(&path, Request::Status, Duration::from_millis(150))
                .await
                .unwrap_err();
            assert!(
                err.to_string().contains("did not answer within 150 ms"),
                "{err}"
            );
        });
    }
}
