"""Active Directory over LDAP: users, administrators and scan processes (R14)."""
