"""Jumpstarter's spellings, as thin aliases of jmp_testing: `from jumpstarter_testing.pytest
import JumpstarterTest` works as Jumpstarter's documentation writes it. (Installing this
package and Jumpstarter's own jumpstarter-testing in one environment makes them clash; use one.)
"""
