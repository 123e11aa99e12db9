fn main() -> std::process::ExitCode {
    jmpd::main()
}
