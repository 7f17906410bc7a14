//! Runs the real `routing-service` binary's `token` and `config` commands
//! and checks their output and exit codes.

use std::process::{Command, Output};

use routing_service::auth::{Verifier, unix_now};
use routing_service::config::{Config, Secret};

const SECRET: &str = "cli-test-secret-0123456789abcdef-0123";

/// Runs the binary with only the given environment variables.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_routing-service"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("the binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8")
}

#[tokio::test]
async fn token_verifies_with_secret() {
    let output = run(
        &["token", "--user", "alice", "--ttl", "10m"],
        &[("JWT_SECRET", SECRET)],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.ends_with('\n'), "{text:?}");
    let token = text.trim_end_matches('\n');
    assert_eq!(token.lines().count(), 1, "{text:?}");

    let mut config = Config::defaults();
    config.jwt_secret = Some(Secret(SECRET.to_owned()));
    let verifier = Verifier::new(&config).await.expect("the verifier builds");
    let identity = verifier.verify(token).await.expect("the token verifies");
    assert_eq!(identity.user.id(), "alice");
    let expected_exp = unix_now() + 600;
    assert!(
        identity.expires_at.abs_diff(expected_exp) <= 5,
        "exp {}",
        identity.expires_at
    );
}

#[test]
fn token_rejects_invalid_user() {
    let output = run(&["token", "--user", "has space"], &[("JWT_SECRET", SECRET)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stdout(&output).is_empty());
    assert!(
        stderr(&output).starts_with("error: --user is not a valid user id"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn config_masks_secret() {
    let url = "postgres://app:hunter2@db:5432/routing";
    let env = [
        ("JWT_SECRET", SECRET),
        ("ROUTING_MESSAGE_STORE__POSTGRES__URL", url),
    ];
    let output = run(&["config"], &env);
    assert!(output.status.success(), "{}", stderr(&output));

    let yaml = stdout(&output);
    assert!(!yaml.contains(SECRET), "{yaml}");
    assert!(!yaml.contains("hunter2"), "{yaml}");
    assert!(
        yaml.contains("# JWT_SECRET: *** (set in the environment)"),
        "{yaml}"
    );
    assert!(
        yaml.contains("postgres://app:***@db:5432/routing"),
        "{yaml}"
    );
    assert!(yaml.contains("api_port: 8082"), "{yaml}");
}

#[test]
fn config_reads_file_option() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("routing.yaml");
    std::fs::write(&path, "api_port: 9123\n").expect("write the config file");
    let path = path.to_str().expect("a UTF-8 path");

    let output = run(&["--config", path, "config"], &[("JWT_SECRET", SECRET)]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("api_port: 9123"));

    let output = run(
        &["config"],
        &[("JWT_SECRET", SECRET), ("ROUTING_CONFIG", path)],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("api_port: 9123"));
}

#[test]
fn unknown_env_key_exits_2() {
    let output = run(
        &["config"],
        &[("JWT_SECRET", SECRET), ("ROUTING_API_PROT", "9000")],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(stdout(&output).is_empty());
    let message = stderr(&output);
    assert!(message.starts_with("error: "), "{message}");
    assert!(message.contains("ROUTING_API_PROT"), "{message}");
}

#[test]
fn missing_secret_exits_2() {
    for args in [&["config"][..], &["token", "--user", "alice"], &[]] {
        let output = run(args, &[]);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let message = stderr(&output);
        assert!(message.starts_with("error: "), "{args:?}: {message}");
        assert!(message.contains("JWT_SECRET"), "{args:?}: {message}");
    }
}

#[test]
fn short_secret_exits_2() {
    let output = run(&["token", "--user", "alice"], &[("JWT_SECRET", "short")]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stdout(&output).is_empty());
    assert!(!stderr(&output).contains("short\n"));
    assert!(stderr(&output).contains("32 bytes"), "{}", stderr(&output));
}
