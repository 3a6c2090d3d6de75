// The part of {fmt} that MLX's CUDA headers use: `fmt::format` with "{}" placeholders, in error
// messages of inline templates. mlx's wheel ships those headers but not {fmt}; this stands in for
// it so the cuDNN attention extension builds from pip packages alone.
#pragma once

#include <sstream>
#include <string>
#include <string_view>

namespace fmt {

inline void format_into(std::ostringstream& out, std::string_view f) {
  out << f;
}

template <typename T, typename... Rest>
void format_into(std::ostringstream& out, std::string_view f, const T& value, const Rest&... rest) {
  auto at = f.find("{}");
  if (at == std::string_view::npos) {
    out << f;
    return;
  }
  out << f.substr(0, at) << value;
  format_into(out, f.substr(at + 2), rest...);
}

template <typename... Args>
std::string format(std::string_view f, const Args&... args) {
  std::ostringstream out;
  format_into(out, f, args...);
  return out.str();
}

}  // namespace fmt
