# A test that names no board: under a CI recipe (`jmp create lease ...`, then pytest) it runs on
# the board of the job's lease, as every `jmp` command in that job does.


def test_the_jobs_board(jmp_board):
    assert jmp_board.lease, "a leased board"
    jmp_board.power.on()
    assert jmp_board.serial.read_until("boot complete") is not None
    jmp_board.power.off()
