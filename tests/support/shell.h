// Runs a shell command line for a test and collects what it prints, or wrote to a file.
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

// The whole content of the file at `path` (what a command wrote); empty if it cannot be read.
std::string ReadFile(const std::string& path);

}  // namespace medgate::test_support

#endif  // MEDGATE_TESTS_SUPPORT_SHELL_H_
