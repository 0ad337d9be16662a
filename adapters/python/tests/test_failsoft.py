import unittest

from poolscope_adapter._failsoft import quietly, suppressed_errors


class QuietlyTest(unittest.TestCase):
    def test_an_exception_is_swallowed_and_counted(self):
        before = suppressed_errors()
        with quietly():
            raise ValueError("a bug of ours")
        with quietly():
            {}["missing"]
        self.assertEqual(suppressed_errors(), before + 2)

    def test_the_block_runs_and_nothing_is_counted_without_an_error(self):
        before = suppressed_errors()
        ran = []
        with quietly():
            ran.append(1)
        self.assertEqual(ran, [1])
        self.assertEqual(suppressed_errors(), before)

    def test_interrupts_and_exits_pass_through(self):
        with self.assertRaises(KeyboardInterrupt):
            with quietly():
                raise KeyboardInterrupt
        with self.assertRaises(SystemExit):
            with quietly():
                raise SystemExit(3)


if __name__ == "__main__":
    unittest.main()
