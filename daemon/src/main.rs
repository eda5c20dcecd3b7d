fn main() -> std::process::ExitCode {
    pcrd::cli::main()
}
