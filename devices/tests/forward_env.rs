//! `JMP_ALLOW_LOCAL_USERS` shares an attachment's local ports as `--allow-local-users` does
//! (a cloud IDE's proxy runs as another user and starts attachments from scripts). Its own
//! test binary: it sets the process environment, which no other test may read meanwhile.

use clap::Parser;
use jmp_devices::common::listen::ForwardArgs;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    forward: ForwardArgs,
}

#[test]
fn the_environment_shares_local_ports_as_the_flag_does() {
    std::env::remove_var("JMP_ALLOW_LOCAL_USERS");
    assert!(
        !Cli::parse_from(["jmp"]).forward.allow_local_users,
        "owner only by default"
    );
    assert!(
        Cli::parse_from(["jmp", "--allow-local-users"])
            .forward
            .allow_local_users
    );
    std::env::set_var("JMP_ALLOW_LOCAL_USERS", "1");
    assert!(
        Cli::parse_from(["jmp"]).forward.allow_local_users,
        "JMP_ALLOW_LOCAL_USERS=1"
    );
    std::env::set_var("JMP_ALLOW_LOCAL_USERS", "0");
    assert!(
        !Cli::parse_from(["jmp"]).forward.allow_local_users,
        "JMP_ALLOW_LOCAL_USERS=0"
    );
    std::env::remove_var("JMP_ALLOW_LOCAL_USERS");
}
