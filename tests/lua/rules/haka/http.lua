-- Haka's http dissector is not part of tcpguard.
local http = require('protocol/http')
