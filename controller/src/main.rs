fn main() -> std::process::ExitCode {
    jmp_controller::main()
}
