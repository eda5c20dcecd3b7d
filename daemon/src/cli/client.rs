pub(super) fn run(_command: super::Command) -> std::process::ExitCode {
    std::process::ExitCode::from(super::exit::USAGE)
}
