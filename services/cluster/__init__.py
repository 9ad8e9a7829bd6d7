"""The cluster service: several ``xcore serve`` nodes on one PostgreSQL log act as one."""
