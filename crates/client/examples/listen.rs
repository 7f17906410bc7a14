//! Opens a WebSocket to routing-service, prints every frame as one JSON
//! line, and acknowledges each message after printing it.
//!
//! ```text
//! cargo run -p routing-client --example listen -- ws://127.0.0.1:8085 "$TOKEN"
//! ```

use routing_client::{Client, Event};
use routing_protocol::ServerFrame;

#[tokio::main]
async fn main() {
    if let Err(err) = listen().await {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

async fn listen() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(websocket_url), Some(token)) = (args.next(), args.next()) else {
        eprintln!("usage: listen WEBSOCKET_URL TOKEN   (for example ws://127.0.0.1:8085)");
        std::process::exit(2);
    };

    let client = Client::new("http://unused.invalid", &websocket_url, &token);
    let mut connection = client.connect().await?;
    loop {
        match connection.next_event().await? {
            Event::Frame(frame) => {
                println!("{}", serde_json::to_string(&frame)?);
                if let ServerFrame::Message { seq, .. } = frame {
                    connection.ack(seq).await?;
                }
            }
            Event::Closed(reason) => {
                eprintln!("connection closed: {reason:?}");
                return Ok(());
            }
        }
    }
}
