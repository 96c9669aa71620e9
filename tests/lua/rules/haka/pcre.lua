-- Haka's sample tcp/security.lua matches shell-code with its PCRE module, which tcpguard does not have.
local rem = require("regexp/pcre")
