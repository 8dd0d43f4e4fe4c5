//! A stand-in partner for `replicate --instant-partner`: it authenticates like a real unit,
//! then acknowledges every action as soon as it has read it, storing nothing. Unit A then pays
//! everything replication costs it (its log, file reads, TLS, the sender) while the partner
//! costs almost nothing on the shared machine, as if it ran on hardware of its own. It is not
//! a durability test and says nothing of a real partner's lag.

use anyhow::Result;
use hasync::link::{self, LinkConfig};
use hasync::proto::{Frame, Role};
use std::net::SocketAddr;

/// Secret of the benchmark's pair (see `replicate::pair_configs`).
pub const SECRET: &str = "benchmark shared secret";

/// Serves partner links on `listen` until the process ends.
pub fn start(listen: SocketAddr) -> Result<()> {
    let cfg = LinkConfig::self_signed("gw_b", SECRET.as_bytes(), 1)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind(listen))?;
    std::thread::Builder::new()
        .name("instant-partner".into())
        .spawn(move || {
            runtime.block_on(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let cfg = cfg.clone();
                    tokio::spawn(async move {
                        if let Err(e) = acknowledge_all(tcp, &cfg).await {
                            eprintln!("instant partner: {e}");
                        }
                    });
                }
            })
        })?;
    Ok(())
}

async fn acknowledge_all(tcp: tokio::net::TcpStream, cfg: &LinkConfig) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let peer = link::accept(tcp, cfg, Role::Passive).await?;
    let (r, mut w) = tokio::io::split(peer.io);
    let mut frames = link::spawn_reader(r);
    link::write_frame(&mut w, &Frame::Resume(0), &[]).await?;
    w.flush().await?;
    let mut heartbeat = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            first = frames.recv() => {
                let mut last = None;
                let mut next = first;
                loop {
                    match next {
                        None => return Ok(()),
                        Some(Err(e)) => return Err(e.into()),
                        Some(Ok(Frame::Add { seq, .. } | Frame::Delete { seq, .. })) => last = Some(seq),
                        // The sender's rebuild after its start asks what is missing: all of it.
                        Some(Ok(Frame::Request { arg, .. })) => {
                            link::write_frame(&mut w, &Frame::Reply { ok: true, data: arg }, &[]).await?;
                            w.flush().await?;
                        }
                        Some(Ok(_)) => {}
                    }
                    match frames.try_recv() {
                        Ok(f) => next = Some(f),
                        Err(_) => break,
                    }
                }
                if let Some(seq) = last {
                    link::write_frame(&mut w, &Frame::Ack(seq), &[]).await?;
                    w.flush().await?;
                }
            }
            _ = heartbeat.tick() => {
                link::write_frame(&mut w, &Frame::Heartbeat { role: Role::Passive, priority: 1 }, &[]).await?;
                w.flush().await?;
            }
        }
    }
}
