fn main() -> std::process::ExitCode {
    jmp::main()
}
