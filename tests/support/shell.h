// Runs a shell command line for a test and collects what it prints.
#ifndef MEDGATE_TESTS_SUPPORT_SHELL_H_
#define MEDGATE_TESTS_SUPPORT_SHELL_H_

#include <string>

namespace medgate::test_support {

struct ShellRun {
  int exit_code = -1;  // -1: it could not be started, or ended by a signal
  std::string output;  // its standard output (add 2>&1 to the command for its errors too)
};

// Runs `command` with /bin/sh and waits for it to end.
ShellRun RunShell(const std::string& command);

}  // namespace medgate::test_support

#endif  // MEDGATE_TESTS_SUPPORT_SHELL_H_
